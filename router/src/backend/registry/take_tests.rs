//! Batch builder tests: TGI budgets, oldest head across queues, skip-not-block, the cap on
//! distinct adapters, spent turns yielding to starved adapters.

use std::time::{Duration, Instant};

use super::*;
use crate::backend::queue::BatchBudget;
use crate::backend::testing::{Events, entry, request, single};

fn registry(cap: usize) -> Registry {
    Registry::new(RegistryConfig {
        max_slots: 8,
        budget_bytes: 1000,
        max_active_adapters: cap,
        cycle_time: Duration::from_secs(1),
        max_concurrent_loads: 8,
        error_ttl: Duration::from_secs(10),
        max_tracked: 100,
    })
}

struct Queues {
    reg: Registry,
    next_id: u64,
    receivers: Vec<Events>,
    t0: Instant,
}

impl Queues {
    fn new(cap: usize) -> Self {
        Self {
            reg: registry(cap),
            next_id: 0,
            receivers: Vec::new(),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Queues a request; returns its id.
    fn push(&mut self, spec: &AdapterSpec, input: usize, max_new: u32) -> u64 {
        let (e, rx) = entry(request(spec.clone(), input, max_new));
        self.receivers.push(rx);
        let id = self.next_id;
        self.next_id += 1;
        self.reg
            .enqueue(id, e, spec.key(), self.t0)
            .expect("enqueue");
        id
    }

    /// Makes `spec` resident (as if its prepare and install finished).
    fn resident(&mut self, spec: &AdapterSpec) {
        for j in self.reg.plan(self.t0).jobs {
            if let Job::Prepare { key, id, .. } = j {
                self.reg.prepared(&key, id, 1);
            }
        }
        for j in self.reg.plan(self.t0).jobs {
            if let Job::Install { key, .. } = j {
                self.reg.installed(&key, 1, self.t0);
            }
        }
        assert!(
            self.reg.adapters[&spec.key()].resident_slot().is_some(),
            "resident"
        );
    }

    fn take(&mut self, budget: BatchBudget, ms: u64) -> Vec<u64> {
        let now = self.at(ms);
        self.reg
            .take_batch(budget, now)
            .iter()
            .map(|t| t.id)
            .collect()
    }
}

fn budget(prefill: u32, total: u32) -> BatchBudget {
    BatchBudget {
        min_size: None,
        max_size: None,
        prefill_tokens: prefill,
        total_tokens: total,
    }
}

#[test]
fn respects_token_budgets_in_fifo_order() {
    let mut q = Queues::new(8);
    for _ in 0..3 {
        q.push(&AdapterSpec::Base, 10, 10);
    }
    // Requests join while the step's prompt budget has room: 0 and 1 use it up exactly.
    assert_eq!(q.take(budget(20, 1000), 0), vec![0, 1]);
    assert_eq!(q.reg.queued(), 1);
    assert!(
        q.take(budget(100, 15), 0).is_empty(),
        "20 total tokens do not fit 15"
    );
    assert_eq!(q.reg.queued(), 1);
}

#[test]
fn min_and_max_size() {
    let mut q = Queues::new(8);
    let a = single("a");
    q.push(&AdapterSpec::Base, 1, 1);
    q.push(&a, 1, 1);
    q.push(&AdapterSpec::Base, 1, 1);
    q.resident(&a);
    let mut b = budget(100, 100);
    b.min_size = Some(4);
    assert!(q.take(b, 0).is_empty());
    assert_eq!(q.reg.queued(), 3, "rolled back into their queues");
    assert_eq!(q.reg.adapters[&a.key()].running, 0, "not marked running");
    b.min_size = None;
    b.max_size = Some(2);
    assert_eq!(q.take(b, 0), vec![0, 1], "order kept after the rollback");
}

#[test]
fn cancelled_requests_are_dropped() {
    let mut q = Queues::new(8);
    q.push(&AdapterSpec::Base, 1, 1);
    q.push(&AdapterSpec::Base, 1, 1);
    q.receivers.remove(0);
    assert_eq!(q.take(budget(100, 100), 0), vec![1]);
}

#[test]
fn oldest_head_across_ready_queues_and_skip_not_ready() {
    let mut q = Queues::new(8);
    let (a, b, c) = (single("a"), single("b"), single("c"));
    q.push(&a, 1, 1); // 0
    q.push(&AdapterSpec::Base, 1, 1); // 1
    q.push(&b, 1, 1); // 2
    q.push(&a, 1, 1); // 3
    q.push(&AdapterSpec::Base, 1, 1); // 4
    q.resident(&a);
    q.resident(&b);
    q.push(&c, 1, 1); // 5: c is waiting (not planned)
    q.push(&b, 1, 1); // 6
    assert_eq!(
        q.take(budget(100, 100), 0),
        vec![0, 1, 2, 3, 4, 6],
        "c skipped"
    );
    assert_eq!(q.reg.adapters[&c.key()].queue.len(), 1);
    assert_eq!(q.reg.adapters[&a.key()].running, 2);
    // The batch stops once the step's prompt budget is used up (FIFO, as in TGI): the last
    // request may overflow it, the shards prefill the rest in later steps.
    q.resident(&c);
    q.push(&AdapterSpec::Base, 50, 1); // 7
    q.push(&AdapterSpec::Base, 1, 1); // 8
    assert_eq!(q.take(budget(40, 1000), 0), vec![5, 7]);
    assert_eq!(q.reg.queued(), 1, "8 waits for the next step");
}

#[test]
fn distinct_adapters_per_batch_are_capped() {
    let mut q = Queues::new(2);
    let (a, b, c) = (single("a"), single("b"), single("c"));
    for spec in [&a, &b, &c] {
        q.push(spec, 1, 1);
    }
    for spec in [&a, &b, &c] {
        q.resident(spec);
    }
    q.push(&AdapterSpec::Base, 1, 1); // 3
    q.push(&a, 1, 1); // 4
    assert_eq!(
        q.take(budget(100, 100), 0),
        vec![0, 1, 3, 4],
        "c skipped: cap 2"
    );
    // While a and b run, c cannot join; once a finishes, it can.
    assert!(q.take(budget(100, 100), 0).is_empty());
    q.reg.release(&a.key(), q.at(1));
    q.reg.release(&a.key(), q.at(1));
    assert_eq!(q.take(budget(100, 100), 1), vec![2]);
}

#[test]
fn spent_turns_yield_to_starved_adapters() {
    let mut q = Queues::new(1);
    let (a, b) = (single("a"), single("b"));
    q.push(&a, 1, 1); // 0
    q.resident(&a);
    q.push(&b, 1, 1); // 1
    q.resident(&b);
    assert_eq!(q.take(budget(100, 100), 0), vec![0], "cap 1: a only");
    for _ in 0..3 {
        q.push(&a, 1, 1); // 2, 3, 4
    }
    // a is inside its turn: it keeps being served although b waits.
    assert_eq!(q.take(budget(1, 100), 500), vec![2]);
    // a's turn (1 s, started at 0) is spent and b is starved: a yields.
    assert!(q.take(budget(100, 100), 1000).is_empty());
    // Once a's requests finished, b goes first although a's queued requests are older.
    q.reg.release(&a.key(), q.at(1001));
    q.reg.release(&a.key(), q.at(1001));
    assert_eq!(q.take(budget(100, 100), 1002), vec![1]);
    // b's turn is fresh; when it is spent and a is starved, a comes back (round robin).
    q.push(&b, 1, 1); // 5
    assert!(
        q.take(budget(100, 100), 2002).is_empty(),
        "b yields, a capped out"
    );
    q.reg.release(&b.key(), q.at(2003));
    assert_eq!(q.take(budget(100, 100), 2004), vec![3, 4]);
}

#[test]
fn without_starvation_the_oldest_request_goes_first_whatever_the_turns() {
    let mut q = Queues::new(8);
    let (a, b) = (single("a"), single("b"));
    q.push(&a, 1, 1); // 0
    q.push(&a, 1, 1); // 1
    q.resident(&a);
    q.push(&b, 1, 1); // 2
    q.resident(&b);
    // a's turn starts at 0 and stays spent while its first request runs.
    assert_eq!(q.take(budget(1, 100), 0), vec![0]);
    // At 1.5 s a's turn is spent and b never had one; nobody is starved (cap 8), so a's older
    // request 1 goes before b's 2.
    assert_eq!(q.take(budget(1, 100), 1500), vec![1]);
    assert_eq!(q.take(budget(1, 100), 1500), vec![2]);
}

#[test]
fn the_last_request_may_overflow_the_step_budget_and_the_total_budget_still_holds() {
    let mut q = Queues::new(8);
    q.push(&AdapterSpec::Base, 4, 10); // 0
    q.push(&AdapterSpec::Base, 100, 10); // 1: longer than the 16-token step budget
    q.push(&AdapterSpec::Base, 100, 10); // 2
    // 0 leaves 12 of the 16 prompt tokens: 1 joins (12 of its tokens this step, the rest
    // later), and nothing joins after it.
    assert_eq!(q.take(budget(16, 1000), 0), vec![0, 1]);
    // A long prompt at the head opens a batch alone.
    q.push(&AdapterSpec::Base, 4, 10); // 3
    assert_eq!(q.take(budget(16, 1000), 0), vec![2]);
    // The total-token budget (prompt + max new tokens) is never exceeded.
    q.push(&AdapterSpec::Base, 100, 10); // 4
    assert!(q.take(budget(16, 13), 0).is_empty(), "3 needs 14");
    assert_eq!(q.reg.queued(), 2);
    assert_eq!(q.take(budget(16, 123), 0), vec![3], "4 needs 110 more");
    assert_eq!(q.take(budget(16, 110), 0), vec![4]);
}
