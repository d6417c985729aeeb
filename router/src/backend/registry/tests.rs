//! Registry tests: single flight, slot free list, LRU by bytes, pinning, skip-not-block,
//! errors and rotation, driven by hand (no shard; load outcomes are reported directly).

use std::time::{Duration, Instant};

use medley_merge::Strategy;

use super::*;
use crate::backend::queue::{BatchBudget, take_batch};
use crate::backend::testing::{Events, entry, merge, request, single};

fn cfg(slots: u32, budget: u64) -> RegistryConfig {
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
struct Harness {
    reg: Registry,
    next_id: u64,
    receivers: Vec<Events>,
    t0: Instant,
}

impl Harness {
    fn new(cfg: RegistryConfig) -> Self {
        Self {
            reg: Registry::new(cfg),
            next_id: 0,
            receivers: Vec::new(),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn enqueue(&mut self, spec: &AdapterSpec, ms: u64) -> Result<Enqueued, InferError> {
        let (e, rx) = entry(request(spec.clone(), 1, 1));
        self.receivers.push(rx);
        self.next_id += 1;
        self.reg.enqueue(self.next_id, e, spec.key(), self.at(ms))
    }

    fn plan(&mut self, ms: u64) -> Vec<LoadJob> {
        let plan = self.reg.plan(self.at(ms));
        assert!(plan.failed.is_empty(), "unexpected failures");
        plan.jobs
    }

    /// Reports a successful load of `bytes` (after its offloads) for every job.
    fn load_all(&mut self, jobs: &[LoadJob], bytes: u64, ms: u64) {
        for j in jobs {
            self.reg.free_slots(&j.free_after);
            self.reg.loaded(&j.key, j.slot, bytes, self.at(ms));
        }
    }

    /// Runs every runnable request to completion (start and finish at `ms`).
    fn serve(&mut self, ms: u64) -> usize {
        let budget = BatchBudget {
            min_size: None,
            max_size: None,
            prefill_tokens: 1 << 20,
            total_tokens: 1 << 20,
        };
        let now = self.at(ms);
        let taken = take_batch(&mut self.reg, budget, now);
        for t in &taken {
            if let Some((key, _)) = t.adapter {
                self.reg.release(&key, self.at(ms));
            }
        }
        taken.len()
    }

    /// Takes a batch within `budget` at `ms` (its requests keep running).
    fn take(&mut self, budget: BatchBudget, ms: u64) -> usize {
        let now = self.at(ms);
        take_batch(&mut self.reg, budget, now).len()
    }

    fn status(&self, spec: &AdapterSpec) -> &Status {
        &self.reg.adapters[&spec.key()].status
    }

    fn slot(&self, spec: &AdapterSpec) -> Option<u32> {
        self.reg.adapters[&spec.key()].resident_slot()
    }
}

#[test]
fn single_flight_one_load_per_key() {
    let mut h = Harness::new(cfg(4, 1000));
    let m = merge(&["a", "b"], Strategy::Ties);
    assert_eq!(h.enqueue(&m, 0).unwrap(), Enqueued::Miss);
    assert_eq!(h.enqueue(&m, 0).unwrap(), Enqueued::Pending);
    let jobs = h.plan(0);
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        h.enqueue(&m, 0).unwrap(),
        Enqueued::Pending,
        "joins the load in flight"
    );
    assert!(h.plan(0).is_empty(), "no second load while staging");
    h.load_all(&jobs, 10, 1);
    assert_eq!(h.enqueue(&m, 1).unwrap(), Enqueued::Ready);
    assert_eq!(h.serve(1), 4);
    // A different weight is a different merge.
    let other = merge(&["a", "b"], Strategy::Linear);
    assert_eq!(h.enqueue(&other, 2).unwrap(), Enqueued::Miss);
    assert_eq!(h.plan(2).len(), 1);
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
        let jobs = h.plan(ms);
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
        h.load_all(&jobs, 10, ms + 1);
        assert_eq!(h.serve(ms + 2), 1);
        seen.push(job.slot);
    }
    assert_eq!(seen, vec![1, 2, 1, 2, 1]);
    assert_eq!(h.reg.free_slot_count(), 0);
    assert_eq!(h.reg.used_bytes(), 20);
}

#[test]
fn lru_by_bytes_never_touches_pinned_adapters() {
    let mut h = Harness::new(cfg(8, 100));
    let (a, b, c, d) = (single("a"), single("b"), single("c"), single("d"));
    for (spec, bytes, ms) in [(&a, 40, 0), (&b, 40, 10), (&c, 10, 20)] {
        h.enqueue(spec, ms).unwrap();
        let jobs = h.plan(ms);
        h.load_all(&jobs, bytes, ms);
        h.serve(ms);
    }
    assert_eq!(h.reg.used_bytes(), 90);
    // d's size is unknown: it is tried, the shard reports no room, so something is evicted.
    let a_slot = h.slot(&a).expect("a resident");
    h.enqueue(&d, 30).unwrap();
    let jobs = h.plan(30);
    assert!(jobs[0].offload.is_empty(), "unknown size: try first");
    assert!(
        h.reg
            .load_failed(
                &d.key(),
                jobs[0].slot,
                LoadFailure::NoRoom("full".into()),
                h.at(31)
            )
            .is_none(),
        "waits for room while others hold memory"
    );
    let jobs = h.plan(32);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].offload, vec![a_slot], "LRU victim is a");
    assert!(matches!(h.status(&a), Status::Evicted));
    h.load_all(&jobs, 50, 33);
    h.serve(33);
    assert_eq!(h.reg.used_bytes(), 100);
    // Now pin b and c (requests running) and ask for a again (40 bytes, known).
    for spec in [&b, &c] {
        h.enqueue(spec, 40).unwrap();
    }
    let budget = BatchBudget {
        min_size: None,
        max_size: None,
        prefill_tokens: 100,
        total_tokens: 100,
    };
    assert_eq!(h.take(budget, 40), 2);
    let d_slot = h.slot(&d).expect("d resident");
    h.enqueue(&a, 41).unwrap();
    let jobs = h.plan(41);
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].offload,
        vec![d_slot],
        "only the idle adapter d may go; b and c are pinned"
    );
    assert!(matches!(h.status(&b), Status::Resident { .. }));
    assert!(matches!(h.status(&c), Status::Resident { .. }));
    // A fourth adapter of known size that cannot fit without evicting pinned ones is blocked.
    let e = single("e");
    h.enqueue(&e, 42).unwrap();
    h.reg
        .adapters
        .get_mut(&e.key())
        .expect("tracked")
        .known_bytes = Some(60);
    assert!(h.plan(43).is_empty());
    assert!(h.reg.adapters[&e.key()].blocked);
}

#[test]
fn blocked_adapters_are_skipped_not_waited_for() {
    let mut h = Harness::new(cfg(4, 100));
    let (x, big, small) = (single("x"), single("big"), single("small"));
    h.enqueue(&x, 0).unwrap();
    let jobs = h.plan(0);
    h.load_all(&jobs, 60, 0);
    // x runs (pinned).
    h.enqueue(&x, 1).unwrap();
    let budget = BatchBudget {
        min_size: None,
        max_size: None,
        prefill_tokens: 100,
        total_tokens: 100,
    };
    assert_eq!(h.take(budget, 1), 2);
    // big (60, known) arrives first and cannot fit; small arrives later and can.
    h.enqueue(&big, 2).unwrap();
    h.reg
        .adapters
        .get_mut(&big.key())
        .expect("tracked")
        .known_bytes = Some(60);
    h.enqueue(&small, 3).unwrap();
    let jobs = h.plan(4);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].key, small.key(), "small is not held up by big");
    assert!(h.reg.adapters[&big.key()].blocked);
    assert!(matches!(h.status(&big), Status::Waiting));
}

#[test]
fn failed_loads_fail_only_their_requests_and_are_cached() {
    let mut h = Harness::new(cfg(4, 1000));
    let (bad, good) = (single("bad"), single("good"));
    h.enqueue(&bad, 0).unwrap();
    h.enqueue(&bad, 0).unwrap();
    h.enqueue(&good, 0).unwrap();
    let jobs = h.plan(0);
    assert_eq!(jobs.len(), 2);
    let bad_job = jobs.iter().find(|j| j.key == bad.key()).expect("bad job");
    let error = InferError::AdapterNotFound("adapter `bad` not found".into());
    let (err, entries) = h
        .reg
        .load_failed(
            &bad.key(),
            bad_job.slot,
            LoadFailure::Failed {
                error: error.clone(),
                cache: true,
            },
            h.at(1),
        )
        .expect("requests to fail");
    assert_eq!(entries.len(), 2);
    assert_eq!(err.to_string(), error.to_string());
    assert_eq!(h.reg.free_slot_count(), 3, "the failed slot is free again");
    // good is untouched.
    let good_job = jobs.iter().find(|j| j.key == good.key()).expect("good job");
    h.reg.loaded(&good.key(), good_job.slot, 10, h.at(1));
    assert_eq!(h.serve(2), 1);
    // Within the TTL a new request gets the error at once; after it, a new load is tried.
    let again = h.enqueue(&bad, 3).unwrap_err();
    assert_eq!(again.to_string(), error.to_string());
    assert_eq!(h.enqueue(&bad, 10_001).unwrap(), Enqueued::Miss);
    assert_eq!(h.plan(10_001).len(), 1);
}

#[test]
fn no_room_with_nothing_to_evict_is_an_error() {
    let mut h = Harness::new(cfg(4, 100));
    let huge = single("huge");
    h.enqueue(&huge, 0).unwrap();
    let jobs = h.plan(0);
    let (err, entries) = h
        .reg
        .load_failed(
            &huge.key(),
            jobs[0].slot,
            LoadFailure::NoRoom("needs 500".into()),
            h.at(1),
        )
        .expect("fails: nothing else holds memory");
    assert_eq!(entries.len(), 1);
    assert!(
        matches!(err, InferError::Generation(ref m) if m.contains("needs 500")),
        "{err}"
    );
    // A known size above the whole budget fails at planning time.
    let mut h = Harness::new(cfg(4, 100));
    h.enqueue(&huge, 0).unwrap();
    h.reg
        .adapters
        .get_mut(&huge.key())
        .expect("tracked")
        .known_bytes = Some(500);
    let plan = h.reg.plan(h.at(0));
    assert!(plan.jobs.is_empty());
    assert_eq!(plan.failed.len(), 1);
    assert_eq!(plan.failed[0].1.len(), 1);
}

#[test]
fn rotation_only_after_a_spent_turn() {
    let mut h = Harness::new(cfg(1, 1000));
    let (a, b) = (single("a"), single("b"));
    h.enqueue(&a, 0).unwrap();
    h.enqueue(&a, 0).unwrap();
    let jobs = h.plan(0);
    h.load_all(&jobs, 10, 0);
    // a is resident with queued requests but never served: not rotated.
    h.enqueue(&b, 1).unwrap();
    assert!(h.plan(5000).is_empty(), "a never ran since it was loaded");
    assert!(h.reg.adapters[&b.key()].blocked);
    // a serves one request at t=10 (its turn starts) and keeps one queued.
    let one = BatchBudget {
        min_size: None,
        max_size: Some(1),
        prefill_tokens: 100,
        total_tokens: 100,
    };
    assert_eq!(h.take(one, 10), 1);
    h.reg.release(&a.key(), h.at(11));
    assert!(h.plan(500).is_empty(), "turn not spent yet (cycle 1 s)");
    let jobs = h.plan(1010);
    assert_eq!(jobs.len(), 1, "a's turn is spent: it yields its slot to b");
    assert_eq!(jobs[0].key, b.key());
    assert!(matches!(h.status(&a), Status::Waiting), "a keeps its queue");
    assert_eq!(h.reg.adapters[&a.key()].queue.len(), 1);
    // A running adapter is never rotated, whatever its turn.
    h.load_all(&jobs, 10, 1011);
    assert_eq!(h.take(one, 1012), 1);
    assert!(
        h.plan(9000).is_empty(),
        "b is pinned by its running request"
    );
    assert!(h.reg.adapters[&a.key()].blocked);
}

#[test]
fn adapters_disabled_without_slots() {
    let mut h = Harness::new(cfg(0, 0));
    let err = h.enqueue(&single("a"), 0).unwrap_err();
    assert!(err.to_string().contains("not enabled"), "{err}");
    assert_eq!(h.enqueue(&AdapterSpec::Base, 0).unwrap(), Enqueued::Ready);
}
