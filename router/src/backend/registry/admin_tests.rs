//! Preloads, pins, unloads and the residency snapshot, driven by hand like the registry tests.

use std::time::Duration;

use tokio::sync::oneshot;

use super::super::tests::{Harness, cfg, installs, prepares};
use super::super::{Failure, Job};
use super::*;
use crate::backend::testing::single;

type Answer = oneshot::Receiver<Result<(), InferError>>;

fn preload(h: &mut Harness, spec: &AdapterSpec, pinned: bool, ms: u64) -> (Enqueued, Answer) {
    let (tx, rx) = oneshot::channel();
    h.next_id += 1;
    let order = h.next_id;
    let at = h.at(ms);
    let kind = h
        .reg
        .preload(spec.key(), spec.clone(), pinned, order, tx, at)
        .expect("preload accepted");
    (kind, rx)
}

fn try_preload(h: &mut Harness, spec: &AdapterSpec, pinned: bool) -> Result<Enqueued, AdminError> {
    let (tx, _rx) = oneshot::channel();
    let at = h.at(0);
    h.reg
        .preload(spec.key(), spec.clone(), pinned, 1000, tx, at)
}

#[test]
fn a_preload_loads_without_requests_and_answers_once_resident() {
    let mut h = Harness::new(cfg(4, 1000));
    let a = single("a");
    let (kind, mut rx) = preload(&mut h, &a, false, 0);
    assert_eq!(kind, Enqueued::Miss);
    let (again, mut rx2) = preload(&mut h, &a, false, 0);
    assert_eq!(again, Enqueued::Pending, "one load for both callers");
    let jobs = h.plan(0);
    assert_eq!(
        prepares(&jobs),
        vec![a.key()],
        "a preload is wanted like a request"
    );
    assert!(rx.try_recv().is_err(), "no answer before it is resident");
    h.prepared(&jobs, 100);
    let jobs = h.plan(1);
    assert_eq!(installs(&jobs).len(), 1);
    h.installed(&jobs, 1);
    assert!(matches!(rx.try_recv(), Ok(Ok(()))));
    assert!(matches!(rx2.try_recv(), Ok(Ok(()))));
    let view = h.reg.adapter(&a.key(), h.at(1)).expect("tracked");
    assert_eq!(view.state, AdapterState::Resident);
    assert_eq!(view.bytes, Some(100));
    assert!(!view.pinned);
    // Idle and unpinned: it stays (a cache), and a later plan does not drop it.
    assert!(h.plan(2).is_empty());
    assert!(matches!(h.status(&a), Status::Resident { .. }));
    // Preloading a resident adapter answers at once.
    let (kind, mut rx) = preload(&mut h, &a, true, 3);
    assert_eq!(kind, Enqueued::Ready);
    assert!(matches!(rx.try_recv(), Ok(Ok(()))));
    assert!(h.reg.adapter(&a.key(), h.at(3)).expect("tracked").pinned);
}

#[test]
fn pinned_adapters_are_never_evicted() {
    let mut h = Harness::new(cfg(2, 1000));
    let (a, b, c) = (single("a"), single("b"), single("c"));
    preload(&mut h, &a, true, 0);
    h.load(0, 10);
    assert_eq!(h.slot(&a), Some(1));
    h.enqueue(&b, 1).unwrap();
    h.load(1, 10);
    h.serve(1);
    assert_eq!(h.slot(&b), Some(2));
    // `c` needs a slot: `a` is the least recently used, but pinned; `b` goes.
    h.enqueue(&c, 5).unwrap();
    let jobs = h.plan(5);
    h.prepared(&jobs, 10);
    let jobs = h.plan(6);
    let inst = installs(&jobs);
    assert_eq!(inst.len(), 1);
    assert_eq!(inst[0].key, c.key());
    assert_eq!(inst[0].offload, vec![2], "the unpinned adapter's slot");
    h.installed(&jobs, 6);
    assert_eq!(h.slot(&a), Some(1));
    assert!(matches!(h.status(&b), Status::Evicted));
}

#[test]
fn one_slot_always_stays_unpinned() {
    let mut h = Harness::new(cfg(2, 1000));
    assert!(try_preload(&mut h, &single("a"), true).is_ok());
    let err = try_preload(&mut h, &single("b"), true).expect_err("pin limit");
    assert!(
        matches!(
            err,
            AdminError::PinLimit {
                pinned: 1,
                slots: 2
            }
        ),
        "{err}"
    );
    // Re-pinning the same adapter, or a preload without a pin, is fine.
    assert!(try_preload(&mut h, &single("a"), true).is_ok());
    assert!(try_preload(&mut h, &single("b"), false).is_ok());
    let mut one = Harness::new(cfg(1, 1000));
    assert!(matches!(
        try_preload(&mut one, &single("a"), true),
        Err(AdminError::PinLimit { .. })
    ));
    let mut none = Harness::new(cfg(0, 1000));
    assert!(matches!(
        try_preload(&mut none, &single("a"), false),
        Err(AdminError::Load(InferError::Validation(_)))
    ));
}

#[test]
fn pinned_bytes_leave_less_for_the_rest_and_misfits_fail_at_once() {
    let mut h = Harness::new(cfg(4, 100));
    let (a, b) = (single("a"), single("b"));
    preload(&mut h, &a, true, 0);
    h.load(0, 60);
    h.enqueue(&b, 1).unwrap();
    let jobs = h.plan(1);
    h.prepared(&jobs, 50);
    let plan = h.reg.plan(h.at(2));
    assert_eq!(
        plan.failed.len(),
        1,
        "50 bytes can never fit beside 60 pinned of 100"
    );
    let (error, entries) = &plan.failed[0];
    assert_eq!(entries.len(), 1);
    assert!(error.to_string().contains("pinned"), "{error}");
    assert!(plan.jobs.iter().any(|j| matches!(j, Job::Discard { .. })));
}

#[test]
fn a_failed_preload_answers_with_the_error_and_drops_the_pin() {
    let mut h = Harness::new(cfg(4, 1000));
    let a = single("a");
    let (_, mut rx) = preload(&mut h, &a, true, 0);
    h.plan(0);
    let failure = Failure {
        error: InferError::AdapterNotFound("gone".into()),
        cache: true,
    };
    let failed = h.reg.job_failed(&a.key(), failure, h.at(1));
    assert!(failed.is_some_and(|(_, entries)| entries.is_empty()));
    assert!(matches!(
        rx.try_recv(),
        Ok(Err(InferError::AdapterNotFound(_)))
    ));
    let view = h.reg.adapter(&a.key(), h.at(1)).expect("tracked");
    assert_eq!(view.state, AdapterState::Failed);
    assert!(!view.pinned);
    assert!(view.error.is_some_and(|e| e.contains("gone")));
    // An operator's preload retries at once, without waiting for the error to expire.
    let (kind, _rx) = preload(&mut h, &a, false, 2);
    assert_eq!(kind, Enqueued::Miss);
}

#[test]
fn pending_preloads_fail_when_the_shards_go() {
    let mut h = Harness::new(cfg(4, 1000));
    let (_, mut rx) = preload(&mut h, &single("a"), false, 0);
    h.reg.fail_preloads(&InferError::Unavailable("down".into()));
    assert!(matches!(rx.try_recv(), Ok(Err(InferError::Unavailable(_)))));
}

#[test]
fn unload_frees_an_idle_slot_and_refuses_busy_adapters() {
    let mut h = Harness::new(cfg(4, 1000));
    let (a, b) = (single("a"), single("b"));
    preload(&mut h, &a, true, 0);
    h.load(0, 100);
    let view = h.reg.unload(&a.key(), h.at(1)).expect("unloaded");
    assert_eq!(view.state, AdapterState::Evicted);
    assert!(!view.pinned);
    let r = h.reg.residency(h.at(1));
    assert_eq!(r.used_bytes, 0);
    assert_eq!(
        r.used_slots, 1,
        "the slot is reserved until the shards free it"
    );
    let jobs = h.plan(1);
    let offloaded: Vec<u32> = jobs
        .iter()
        .filter_map(|j| match j {
            Job::Offload { slots } => Some(slots.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(offloaded, vec![1]);
    h.reg.free_slots(&offloaded);
    assert_eq!(h.reg.residency(h.at(1)).used_slots, 0);
    // Requests waiting: refused; loading: refused; unknown: not tracked.
    h.enqueue(&b, 2).unwrap();
    assert!(matches!(
        h.reg.unload(&b.key(), h.at(2)),
        Err(AdminError::InUse { queued: 1, .. })
    ));
    let (_, _rx) = preload(&mut h, &single("c"), false, 2);
    h.plan(2);
    assert!(matches!(
        h.reg.unload(&single("c").key(), h.at(2)),
        Err(AdminError::Loading(_))
    ));
    assert!(matches!(
        h.reg.unload(&single("zz").key(), h.at(2)),
        Err(AdminError::NotTracked(_))
    ));
    // An evicted record is forgotten.
    h.reg.unload(&a.key(), h.at(3)).expect("forgotten");
    assert!(h.reg.adapter(&a.key(), h.at(3)).is_none());
}

#[test]
fn residency_lists_resident_first_with_slots_and_bytes() {
    let mut h = Harness::new(cfg(4, 1000));
    let (a, b) = (single("a"), single("b"));
    h.enqueue(&a, 0).unwrap();
    h.load(0, 30);
    h.serve(0);
    h.enqueue(&b, 1).unwrap();
    let r = h.reg.residency(h.at(1) + Duration::from_millis(5));
    assert_eq!(r.max_slots, 4);
    assert_eq!(r.used_slots, 1);
    assert_eq!(r.used_bytes, 30);
    assert_eq!(r.budget_bytes, Some(1000));
    assert_eq!(r.adapters.len(), 2);
    assert_eq!(r.adapters[0].key, a.key());
    assert_eq!(r.adapters[0].state, AdapterState::Resident);
    assert_eq!(r.adapters[0].slot, Some(1));
    assert_eq!(r.adapters[1].state, AdapterState::Waiting);
    assert_eq!(r.adapters[1].queued, 1);
    assert_eq!(r.adapters[1].bytes, None, "not loaded yet");
}

#[test]
fn keys_are_found_by_unique_prefix() {
    let mut h = Harness::new(cfg(4, 1000));
    let a = single("a");
    h.enqueue(&a, 0).unwrap();
    let hex = a.key().hex();
    assert_eq!(h.reg.find(&hex).expect("whole key"), a.key());
    assert_eq!(
        h.reg.find(&hex[..8].to_uppercase()).expect("prefix"),
        a.key()
    );
    assert!(matches!(h.reg.find(&hex[..7]), Err(AdminError::BadKey(_))));
    assert!(matches!(
        h.reg.find("zzzzzzzzzz"),
        Err(AdminError::BadKey(_))
    ));
    let other = single("b").key().hex();
    assert!(matches!(h.reg.find(&other), Err(AdminError::NotTracked(_))));
}
