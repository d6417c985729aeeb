//! Registry tests: single flight, slot free list, byte accounting from reported sizes, LRU by
//! bytes, pinning, skip-not-block, errors and rotation, driven by hand (no shard; the outcomes
//! of prepares and installs are reported directly).

use std::time::{Duration, Instant};

use medley_spec::Strategy;

use super::*;
use crate::backend::queue::BatchBudget;
use crate::backend::testing::{Events, entry, merge, request, single};

pub(super) fn cfg(slots: u32, budget: u64) -> RegistryConfig {
    RegistryConfig {
        max_slots: slots,
        budget_bytes: budget,
        max_active_adapters: 8,
        cycle_time: Duration::from_secs(1),
        max_concurrent_loads: 4,
        error_ttl: Duration::from_secs(10),
        max_tracked: 100,
    }
}

/// A registry with the receivers of its requests (dropping one would cancel its request).
pub(super) struct Harness {
    pub(super) reg: Registry,
    pub(super) next_id: u64,
    receivers: Vec<Events>,
    t0: Instant,
}

/// What an install job does: its adapter, target slot and the slots it offloads first.
pub(super) struct Install {
    pub(super) key: AdapterKey,
    pub(super) slot: u32,
    pub(super) offload: Vec<u32>,
}

pub(super) fn installs(jobs: &[Job]) -> Vec<Install> {
    jobs.iter()
        .filter_map(|j| match j {
            Job::Install {
                key, slot, offload, ..
            } => Some(Install {
                key: *key,
                slot: *slot,
                offload: offload.clone(),
            }),
            _ => None,
        })
        .collect()
}

pub(super) fn prepares(jobs: &[Job]) -> Vec<AdapterKey> {
    jobs.iter()
        .filter_map(|j| match j {
            Job::Prepare { key, .. } => Some(*key),
            _ => None,
        })
        .collect()
}

impl Harness {
    pub(super) fn new(cfg: RegistryConfig) -> Self {
        Self {
            reg: Registry::new(cfg),
            next_id: 0,
            receivers: Vec::new(),
            t0: Instant::now(),
        }
    }

    pub(super) fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    pub(super) fn enqueue(&mut self, spec: &AdapterSpec, ms: u64) -> Result<Enqueued, InferError> {
        let (e, rx) = entry(request(spec.clone(), 1, 1));
        self.receivers.push(rx);
        self.next_id += 1;
        self.reg.enqueue(self.next_id, e, spec.key(), self.at(ms))
    }

    pub(super) fn plan(&mut self, ms: u64) -> Vec<Job> {
        let plan = self.reg.plan(self.at(ms));
        assert!(plan.failed.is_empty(), "unexpected failures");
        plan.jobs
    }

    /// Reports every prepare of `jobs` as finished with `bytes`.
    pub(super) fn prepared(&mut self, jobs: &[Job], bytes: u64) {
        for j in jobs {
            if let Job::Prepare { key, id, .. } = j {
                assert!(self.reg.prepared(key, *id, bytes));
            }
        }
    }

    /// Reports every install of `jobs` as finished (after its offloads).
    pub(super) fn installed(&mut self, jobs: &[Job], ms: u64) {
        for j in jobs {
            if let Job::Install {
                key, free_after, ..
            } = j
            {
                let Status::Installing { bytes, .. } = self.reg.adapters[key].status else {
                    panic!("installing")
                };
                self.reg.free_slots(free_after);
                self.reg.installed(key, bytes, self.at(ms));
            }
        }
    }

    /// Plans at `ms`, finishes the prepares with `bytes`, plans again and finishes the
    /// installs; returns the second plan's jobs.
    pub(super) fn load(&mut self, ms: u64, bytes: u64) -> Vec<Job> {
        let jobs = self.plan(ms);
        self.prepared(&jobs, bytes);
        let jobs = self.plan(ms);
        self.installed(&jobs, ms);
        jobs
    }

    /// Runs every runnable request to completion (start and finish at `ms`).
    pub(super) fn serve(&mut self, ms: u64) -> usize {
        let budget = BatchBudget {
            min_size: None,
            max_size: None,
            prefill_tokens: 1 << 20,
            total_tokens: 1 << 20,
        };
        let now = self.at(ms);
        let taken = self.reg.take_batch(budget, now);
        for t in &taken {
            if let Some((key, _)) = t.adapter {
                self.reg.release(&key, self.at(ms));
            }
        }
        taken.len()
    }

    /// Takes a batch within `budget` at `ms` (its requests keep running).
    pub(super) fn take(&mut self, budget: BatchBudget, ms: u64) -> usize {
        let now = self.at(ms);
        self.reg.take_batch(budget, now).len()
    }

    pub(super) fn status(&self, spec: &AdapterSpec) -> &Status {
        &self.reg.adapters[&spec.key()].status
    }

    pub(super) fn slot(&self, spec: &AdapterSpec) -> Option<u32> {
        self.reg.adapters[&spec.key()].resident_slot()
    }

    pub(super) fn blocked(&self, spec: &AdapterSpec) -> bool {
        self.reg.adapters[&spec.key()].blocked
    }
}

fn all(prefill: u32) -> BatchBudget {
    BatchBudget {
        min_size: None,
        max_size: None,
        prefill_tokens: prefill,
        total_tokens: prefill,
    }
}

#[test]
fn single_flight_one_load_per_key() {
    let mut h = Harness::new(cfg(4, 1000));
    let m = merge(&["a", "b"], Strategy::Ties);
    assert_eq!(h.enqueue(&m, 0).unwrap(), Enqueued::Miss);
    assert_eq!(h.enqueue(&m, 0).unwrap(), Enqueued::Pending);
    let jobs = h.plan(0);
    assert_eq!(prepares(&jobs), vec![m.key()]);
    assert_eq!(
        h.enqueue(&m, 0).unwrap(),
        Enqueued::Pending,
        "joins the load in flight"
    );
    assert!(h.plan(0).is_empty(), "no second load while preparing");
    h.prepared(&jobs, 10);
    assert_eq!(h.enqueue(&m, 0).unwrap(), Enqueued::Pending, "prepared");
    let jobs = h.plan(1);
    assert_eq!(installs(&jobs).len(), 1);
    h.installed(&jobs, 1);
    assert_eq!(h.enqueue(&m, 1).unwrap(), Enqueued::Ready);
    assert_eq!(h.serve(1), 5);
    // A different weight is a different merge.
    let other = merge(&["a", "b"], Strategy::Linear);
    assert_eq!(h.enqueue(&other, 2).unwrap(), Enqueued::Miss);
    assert_eq!(prepares(&h.plan(2)).len(), 1);
}

#[test]
fn slots_are_reused_from_a_free_list() {
    let mut h = Harness::new(cfg(2, 1000));
    let names = ["a", "b", "c", "d", "e"];
    let mut seen = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ms = 10 * i as u64;
        let spec = single(name);
        h.enqueue(&spec, ms).unwrap();
        let jobs = installs(&h.load(ms, 10));
        assert_eq!(jobs.len(), 1, "{name}");
        let job = &jobs[0];
        assert!((1..=2).contains(&job.slot), "slot {} of {name}", job.slot);
        if i >= 2 {
            // The least recently used idle adapter made room: its slot is offloaded and reused.
            let victim = single(names[i - 2]);
            assert_eq!(job.offload, vec![job.slot], "{name}");
            assert!(matches!(h.status(&victim), Status::Evicted), "{name}");
        } else {
            assert!(job.offload.is_empty());
        }
        assert_eq!(h.serve(ms + 2), 1);
        seen.push(job.slot);
    }
    assert_eq!(seen, vec![1, 2, 1, 2, 1]);
    assert_eq!(h.reg.free_slots.len(), 0);
    assert_eq!(h.reg.used_bytes, 20);
}

#[test]
fn first_loads_reserve_the_bytes_the_shards_report() {
    // Three adapters never seen before, 10 bytes each, a 25-byte budget: all three are prepared
    // at once, but only two are installed; the third waits for room instead of being sent to
    // the shards to fail there.
    let mut h = Harness::new(cfg(8, 25));
    let specs = [single("a"), single("b"), single("c")];
    for (i, s) in specs.iter().enumerate() {
        h.enqueue(s, i as u64).unwrap();
    }
    let jobs = h.plan(3);
    assert_eq!(prepares(&jobs).len(), 3, "prepares need no slot or bytes");
    assert_eq!(
        h.reg.used_bytes, 0,
        "nothing reserved before the size is known"
    );
    h.prepared(&jobs, 10);
    let jobs = h.plan(4);
    let planned = installs(&jobs);
    assert_eq!(planned.len(), 2);
    assert_eq!(h.reg.used_bytes, 20, "installs reserve the reported size");
    assert_eq!(planned[0].key, specs[0].key(), "oldest request first");
    assert!(h.blocked(&specs[2]));
    assert!(matches!(
        h.status(&specs[2]),
        Status::Prepared { bytes: 10, .. }
    ));
    h.installed(&jobs, 5);
    assert_eq!(h.reg.used_bytes, 20);
    // Once a and b have served their requests (idle), c evicts the least recently used.
    assert_eq!(h.serve(6), 2);
    let jobs = installs(&h.plan(7));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].key, specs[2].key());
    assert_eq!(jobs[0].offload.len(), 1);
    assert_eq!(h.reg.used_bytes, 20);
}

#[test]
fn a_budget_of_n_adapters_admits_exactly_n() {
    for n in 1..=4u64 {
        let mut h = Harness::new(RegistryConfig {
            max_concurrent_loads: 8,
            ..cfg(8, 10 * n)
        });
        let specs: Vec<AdapterSpec> = (0..=n).map(|i| single(&format!("a{i}"))).collect();
        for (i, s) in specs.iter().enumerate() {
            h.enqueue(s, i as u64).unwrap();
        }
        let jobs = h.plan(10);
        h.prepared(&jobs, 10);
        let jobs = h.plan(11);
        assert_eq!(installs(&jobs).len() as u64, n, "budget {}", 10 * n);
        h.installed(&jobs, 11);
        // The n resident adapters run (pinned): the last one cannot get in.
        assert_eq!(h.take(all(100), 12) as u64, n);
        assert!(installs(&h.plan(13)).is_empty());
        assert!(h.blocked(&specs[n as usize]));
        assert_eq!(h.reg.used_bytes, 10 * n);
        // One finishes: its slot and bytes go to the last one.
        let first_slot = h.slot(&specs[0]).expect("resident");
        h.reg.release(&specs[0].key(), h.at(14));
        let jobs = installs(&h.plan(15));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].key, specs[n as usize].key());
        assert_eq!(jobs[0].offload, vec![first_slot]);
        assert!(matches!(h.status(&specs[0]), Status::Evicted));
        assert_eq!(h.reg.used_bytes, 10 * n);
    }
}

#[test]
fn lru_by_bytes_never_touches_pinned_adapters() {
    let mut h = Harness::new(cfg(8, 100));
    let (a, b, c, d) = (single("a"), single("b"), single("c"), single("d"));
    for (spec, bytes, ms) in [(&a, 40, 0), (&b, 40, 10), (&c, 10, 20)] {
        h.enqueue(spec, ms).unwrap();
        h.load(ms, bytes);
        h.serve(ms);
    }
    assert_eq!(h.reg.used_bytes, 90);
    // d (50 bytes) needs 40 more: the least recently used idle adapter, a, makes room.
    let a_slot = h.slot(&a).expect("a resident");
    h.enqueue(&d, 30).unwrap();
    let jobs = installs(&h.load(31, 50));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].offload, vec![a_slot], "LRU victim is a");
    assert!(matches!(h.status(&a), Status::Evicted));
    h.serve(33);
    assert_eq!(h.reg.used_bytes, 100);
    // Now pin b and c (requests running) and ask for a again (40 bytes).
    for spec in [&b, &c] {
        h.enqueue(spec, 40).unwrap();
    }
    assert_eq!(h.take(all(100), 40), 2);
    let d_slot = h.slot(&d).expect("d resident");
    h.enqueue(&a, 41).unwrap();
    let jobs = installs(&h.load(41, 40));
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].offload,
        vec![d_slot],
        "only the idle adapter d may go; b and c are pinned"
    );
    assert!(matches!(h.status(&b), Status::Resident { .. }));
    assert!(matches!(h.status(&c), Status::Resident { .. }));
    // A fourth adapter that cannot fit without evicting pinned ones (or a, which has not served
    // its request yet) is blocked.
    let e = single("e");
    h.enqueue(&e, 42).unwrap();
    assert!(installs(&h.load(43, 60)).is_empty());
    assert!(h.blocked(&e));
    assert!(matches!(h.status(&e), Status::Prepared { bytes: 60, .. }));
}

#[test]
fn blocked_adapters_are_skipped_not_waited_for() {
    let mut h = Harness::new(cfg(4, 100));
    let (x, big, small) = (single("x"), single("big"), single("small"));
    h.enqueue(&x, 0).unwrap();
    h.load(0, 60);
    // x runs (pinned).
    h.enqueue(&x, 1).unwrap();
    assert_eq!(h.take(all(100), 1), 2);
    // big (60) arrives first and cannot fit; small (30) arrives later and can.
    h.enqueue(&big, 2).unwrap();
    h.enqueue(&small, 3).unwrap();
    let jobs = h.plan(4);
    assert_eq!(prepares(&jobs), vec![big.key(), small.key()]);
    for (job, bytes) in jobs.iter().zip([60, 30]) {
        h.prepared(std::slice::from_ref(job), bytes);
    }
    let jobs = installs(&h.plan(5));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].key, small.key(), "small is not held up by big");
    assert!(h.blocked(&big));
    assert!(matches!(h.status(&big), Status::Prepared { .. }));
}

#[test]
fn failed_loads_fail_only_their_requests_and_are_cached() {
    let mut h = Harness::new(cfg(4, 1000));
    let (bad, good) = (single("bad"), single("good"));
    h.enqueue(&bad, 0).unwrap();
    h.enqueue(&bad, 0).unwrap();
    h.enqueue(&good, 0).unwrap();
    let jobs = h.plan(0);
    assert_eq!(prepares(&jobs).len(), 2);
    let error = InferError::AdapterNotFound("adapter `bad` not found".into());
    let failure = Failure {
        error: error.clone(),
        cache: true,
    };
    let (err, entries) = h
        .reg
        .job_failed(&bad.key(), failure, h.at(1))
        .expect("requests to fail");
    assert_eq!(entries.len(), 2);
    assert_eq!(err.to_string(), error.to_string());
    assert_eq!(h.reg.staged(), 1, "only good is staged");
    // good is untouched.
    let good_jobs: Vec<Job> = jobs
        .iter()
        .filter(|j| matches!(j, Job::Prepare { key, .. } if *key == good.key()))
        .cloned()
        .collect();
    h.prepared(&good_jobs, 10);
    let jobs = h.plan(1);
    h.installed(&jobs, 1);
    assert_eq!(h.serve(2), 1);
    // Within the TTL a new request gets the error at once; after it, a new load is tried.
    let again = h.enqueue(&bad, 3).unwrap_err();
    assert_eq!(again.to_string(), error.to_string());
    assert_eq!(h.enqueue(&bad, 10_001).unwrap(), Enqueued::Miss);
    assert_eq!(prepares(&h.plan(10_001)).len(), 1);
}

#[test]
fn a_failed_install_returns_its_slot_and_bytes() {
    let mut h = Harness::new(cfg(2, 100));
    let a = single("a");
    h.enqueue(&a, 0).unwrap();
    let jobs = h.plan(0);
    h.prepared(&jobs, 40);
    assert_eq!(installs(&h.plan(1)).len(), 1);
    assert_eq!((h.reg.used_bytes, h.reg.free_slots.len()), (40, 1));
    let failure = Failure {
        error: InferError::Generation("Server error: bug".into()),
        cache: false,
    };
    let (_, entries) = h.reg.job_failed(&a.key(), failure, h.at(2)).expect("fails");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (h.reg.used_bytes, h.reg.free_slots.len(), h.reg.staged()),
        (0, 2, 0)
    );
    assert!(
        matches!(h.status(&a), Status::Evicted),
        "not cached: retried"
    );
    assert_eq!(h.enqueue(&a, 3).unwrap(), Enqueued::Miss);
}

#[test]
fn larger_than_the_budget_is_an_error() {
    let mut h = Harness::new(cfg(4, 100));
    let huge = single("huge");
    h.enqueue(&huge, 0).unwrap();
    let jobs = h.plan(0);
    h.prepared(&jobs, 500);
    let plan = h.reg.plan(h.at(1));
    assert_eq!(plan.failed.len(), 1);
    let (err, entries) = &plan.failed[0];
    assert_eq!(entries.len(), 1);
    assert!(
        matches!(err, InferError::Generation(m) if m.contains("500") && m.contains("100")),
        "{err}"
    );
    assert!(
        matches!(plan.jobs.as_slice(), [Job::Discard { .. }]),
        "the staged adapter is dropped"
    );
    assert_eq!(h.reg.staged(), 0);
    // After the TTL, a known size above the whole budget fails at planning time, unprepared.
    assert_eq!(h.enqueue(&huge, 20_000).unwrap(), Enqueued::Miss);
    let plan = h.reg.plan(h.at(20_000));
    assert!(plan.jobs.is_empty());
    assert_eq!(plan.failed.len(), 1);
    assert_eq!(plan.failed[0].1.len(), 1);
}

#[test]
fn staged_adapters_nobody_wants_are_discarded() {
    let mut h = Harness::new(cfg(1, 100));
    let (a, b) = (single("a"), single("b"));
    h.enqueue(&a, 0).unwrap();
    h.load(0, 10);
    h.enqueue(&a, 1).unwrap();
    assert_eq!(h.take(all(100), 1), 2, "a runs: the only slot is pinned");
    h.enqueue(&b, 2).unwrap();
    let jobs = h.plan(3);
    h.prepared(&jobs, 10);
    assert!(installs(&h.plan(4)).is_empty(), "b waits for the slot");
    // b's client goes away: its staged weights are dropped.
    h.receivers.pop();
    let jobs = h.plan(5);
    assert!(matches!(jobs.as_slice(), [Job::Discard { .. }]), "{jobs:?}");
    assert!(matches!(h.status(&b), Status::Evicted));
    assert_eq!(h.reg.staged(), 0);
}

#[test]
fn staging_is_bounded() {
    let mut h = Harness::new(RegistryConfig {
        max_concurrent_loads: 2,
        ..cfg(8, 1000)
    });
    let specs: Vec<AdapterSpec> = (0..4).map(|i| single(&format!("s{i}"))).collect();
    for (i, s) in specs.iter().enumerate() {
        h.enqueue(s, i as u64).unwrap();
    }
    let jobs = h.plan(10);
    assert_eq!(prepares(&jobs), vec![specs[0].key(), specs[1].key()]);
    h.prepared(&jobs, 10);
    let jobs = h.plan(11);
    assert_eq!(installs(&jobs).len(), 2);
    assert!(prepares(&jobs).is_empty(), "installs still in flight");
    h.installed(&jobs, 12);
    assert_eq!(prepares(&h.plan(13)), vec![specs[2].key(), specs[3].key()]);
}

#[test]
fn rotation_only_after_a_spent_turn() {
    let mut h = Harness::new(cfg(1, 1000));
    let (a, b) = (single("a"), single("b"));
    h.enqueue(&a, 0).unwrap();
    h.enqueue(&a, 0).unwrap();
    h.load(0, 10);
    // a is resident with queued requests but never served: not rotated.
    h.enqueue(&b, 1).unwrap();
    assert!(
        installs(&h.load(5000, 10)).is_empty(),
        "a never ran since it was loaded"
    );
    assert!(h.blocked(&b));
    // a serves one request at t=10 (its turn starts) and keeps one queued.
    let one = BatchBudget {
        max_size: Some(1),
        ..all(100)
    };
    assert_eq!(h.take(one, 10), 1);
    h.reg.release(&a.key(), h.at(11));
    assert!(
        installs(&h.plan(500)).is_empty(),
        "turn not spent yet (cycle 1 s)"
    );
    let jobs = h.plan(1010);
    let planned = installs(&jobs);
    assert_eq!(
        planned.len(),
        1,
        "a's turn is spent: it yields its slot to b"
    );
    assert_eq!(planned[0].key, b.key());
    // a keeps its queue and is prepared again at once, to come back when the slot frees.
    assert_eq!(prepares(&jobs), vec![a.key()]);
    assert_eq!(h.reg.adapters[&a.key()].queue.len(), 1);
    // A running adapter is never rotated, whatever its turn.
    h.installed(&jobs, 1011);
    h.prepared(&jobs, 10);
    assert_eq!(h.take(one, 1012), 1);
    assert!(
        installs(&h.plan(9000)).is_empty(),
        "b is pinned by its running request"
    );
    assert!(h.blocked(&a));
}

#[test]
fn adapters_disabled_without_slots() {
    let mut h = Harness::new(cfg(0, 0));
    let err = h.enqueue(&single("a"), 0).unwrap_err();
    assert!(err.to_string().contains("not enabled"), "{err}");
    assert_eq!(h.enqueue(&AdapterSpec::Base, 0).unwrap(), Enqueued::Ready);
}
