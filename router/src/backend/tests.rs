//! Scheduler tests: [`ShardBackend`] (batching loop + adapter loader) over the in-memory
//! [`FakeShard`]. Every test also checks that the router never broke a shard rule (a request
//! on an empty slot, an offload of a slot in use).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use medley_spec::Strategy;

use super::testing::{FakeAdapter, FakeShard, FakeShardConfig, merge, request, single};
use super::{Backend, ShardBackend};
use crate::config::RouterConfig;
use crate::error::{InferError, ValidationError};
use crate::infer::testing::{test_config, test_limits, word_tokenizer};
use crate::infer::{
    AdapterSpec, GenerateParameters, GenerateRequest, Infer, InferStreamResponse,
    ValidGenerateRequest,
};
use crate::validation::Validation;

/// Adapters of 10 bytes and rank 8 named `names`, plus `r16` (rank 16), `broken` (its load
/// fails with INTERNAL) and `big` / `small` / `x` (60, 30, 60 bytes).
fn adapters(names: &[&str]) -> HashMap<String, FakeAdapter> {
    let mut m: HashMap<String, FakeAdapter> = names
        .iter()
        .map(|n| (n.to_string(), FakeAdapter::new(10, 8)))
        .collect();
    m.insert("r16".into(), FakeAdapter::new(10, 16));
    m.insert(
        "broken".into(),
        FakeAdapter::failing(tonic::Code::Internal, "disk on fire"),
    );
    m.insert("big".into(), FakeAdapter::new(60, 8));
    m.insert("small".into(), FakeAdapter::new(30, 8));
    m.insert("x".into(), FakeAdapter::new(60, 8));
    m
}

fn shard(slots: u32, budget: u64, step_ms: u64) -> FakeShard {
    FakeShard::new(FakeShardConfig {
        slots,
        budget,
        step_delay: Duration::from_millis(step_ms),
        adapters: adapters(&["a", "b", "c", "d", "e", "f"]),
        ..Default::default()
    })
}

fn config(cap: usize, cycle_ms: u64, max_batch_size: Option<usize>) -> RouterConfig {
    let mut c = test_config(test_limits(), PathBuf::new());
    c.batching.max_active_adapters = cap;
    c.batching.adapter_cycle_time = Duration::from_millis(cycle_ms);
    c.batching.max_batch_size = max_batch_size;
    c
}

async fn start(shard: &FakeShard, cfg: &RouterConfig) -> Arc<ShardBackend<FakeShard>> {
    Arc::new(
        ShardBackend::start(shard.clone(), cfg)
            .await
            .expect("backend starts"),
    )
}

/// Runs a request to its end: the generated text (or error) and when it ended.
async fn run(
    backend: &ShardBackend<FakeShard>,
    req: ValidGenerateRequest,
) -> (Result<String, InferError>, Instant) {
    let outcome = async {
        let mut rx = backend.schedule(req)?;
        while let Some(event) = rx.recv().await {
            if let InferStreamResponse::End { generated_text, .. } = event? {
                return Ok(generated_text.text);
            }
        }
        Err(InferError::IncompleteGeneration)
    };
    let result = tokio::time::timeout(Duration::from_secs(20), outcome)
        .await
        .unwrap_or_else(|_| panic!("request did not finish in 20 s"));
    (result, Instant::now())
}

/// The text `n` tokens of a slot labelled `label` produce.
fn text(label: &str, n: usize) -> String {
    format!(" {label}").repeat(n)
}

/// Waits (at most 10 s) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn base_single_and_merged_requests_mix() {
    let shard = shard(4, 1000, 1);
    let backend = start(&shard, &config(128, 2000, None)).await;
    let specs = [
        (AdapterSpec::Base, "base"),
        (single("a"), "a"),
        (merge(&["a", "b"], Strategy::Ties), "merge(a,b)"),
        (single("b"), "b"),
        (
            merge(&["a", "b", "c"], Strategy::DareLinear),
            "merge(a,b,c)",
        ),
        (AdapterSpec::Base, "base"),
    ];
    let results = join_all(
        specs
            .iter()
            .map(|(spec, _)| run(&backend, request(spec.clone(), 3, 4))),
    )
    .await;
    for ((_, label), (result, _)) in specs.iter().zip(results) {
        assert_eq!(result.expect(label), text(label, 4), "{label}");
    }
    assert_eq!(shard.loads().len(), 4, "a, b and two merges, each once");
    // The merge parameters reach the shard in canonical form.
    let merged = shard
        .loads()
        .into_iter()
        .find_map(|l| match l.spec?.kind? {
            medley_proto::shard::v1::adapter_spec::Kind::Merged(m) if m.strategy == "ties" => {
                Some(m)
            }
            _ => None,
        })
        .expect("the ties merge was loaded");
    assert_eq!(
        (
            merged.density,
            merged.majority_sign_method.as_str(),
            merged.semantics.as_str()
        ),
        (Some(0.5), "total", "peft")
    );
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn identical_merges_load_once() {
    let shard = shard(4, 1000, 0);
    let backend = start(&shard, &config(128, 2000, None)).await;
    shard.hold("a");
    let m = merge(&["a", "b"], Strategy::DareTies);
    let all = join_all((0..8).map(|_| run(&backend, request(m.clone(), 2, 2))));
    let (results, ()) = tokio::join!(all, async {
        until("the first load", || shard.loads().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            shard.loads().len(),
            1,
            "later requests join the load in flight"
        );
        shard.release("a");
    });
    for (r, _) in results {
        assert_eq!(r.expect("merged"), text("merge(a,b)", 2));
    }
    assert_eq!(
        shard.loads().len(),
        1,
        "N identical merges, 1 PrepareAdapter"
    );
    // Once resident, more of the same merge are cache hits; another weight is another merge.
    assert!(run(&backend, request(m, 2, 1)).await.0.is_ok());
    assert_eq!(shard.loads().len(), 1);
    assert!(
        run(
            &backend,
            request(merge(&["a", "b"], Strategy::Linear), 2, 1)
        )
        .await
        .0
        .is_ok()
    );
    assert_eq!(shard.loads().len(), 2);
}

#[tokio::test]
async fn a_failing_adapter_fails_only_its_requests() {
    let shard = shard(8, 1000, 1);
    let backend = start(&shard, &config(128, 2000, None)).await;
    let specs = [
        AdapterSpec::Base,
        single("a"),
        single("broken"),
        single("missing"),
        merge(&["a", "r16"], Strategy::Ties),
        merge(&["a", "r16"], Strategy::Cat),
        single("broken"),
    ];
    let results: Vec<_> = join_all(
        specs
            .iter()
            .map(|s| run(&backend, request(s.clone(), 2, 3))),
    )
    .await
    .into_iter()
    .map(|(r, _)| r)
    .collect();
    assert_eq!(results[0].as_deref().ok(), Some(text("base", 3).as_str()));
    assert_eq!(results[1].as_deref().ok(), Some(text("a", 3).as_str()));
    for i in [2, 6] {
        match &results[i] {
            Err(e @ InferError::Generation(_)) => assert_eq!(
                e.to_string(),
                "Request failed during generation: Server error: disk on fire"
            ),
            other => panic!("broken: {other:?}"),
        }
    }
    match &results[3] {
        Err(e @ InferError::AdapterNotFound(m)) => {
            assert!(m.contains("`missing`"), "{m}");
            assert_eq!(e.http_status(), 404);
        }
        other => panic!("missing: {other:?}"),
    }
    match &results[4] {
        Err(InferError::Validation(ValidationError::AdapterRejected(m))) => {
            assert!(m.contains("`cat`"), "{m}")
        }
        other => panic!("mixed ranks: {other:?}"),
    }
    assert_eq!(
        results[5].as_deref().ok(),
        Some(text("merge(a,r16)", 3).as_str())
    );
    // The failure is remembered for a while: a new request fails at once, without a new load.
    let broken_loads = || {
        shard
            .load_labels()
            .iter()
            .filter(|l| l.as_str() == "broken")
            .count()
    };
    assert_eq!(broken_loads(), 1, "both broken requests shared one load");
    let (again, _) = run(&backend, request(single("broken"), 2, 1)).await;
    assert!(matches!(again, Err(InferError::Generation(_))));
    assert_eq!(broken_loads(), 1);
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn slots_are_reused() {
    let shard = shard(2, 1000, 0);
    let backend = start(&shard, &config(128, 2000, None)).await;
    for name in ["a", "b", "c", "d", "e", "a"] {
        let (r, _) = run(&backend, request(single(name), 2, 1)).await;
        assert_eq!(r.expect(name), text(name, 1));
    }
    let slots: Vec<u32> = shard.install_slots();
    assert_eq!(
        slots,
        vec![1, 2, 1, 2, 1, 2],
        "LRU victims' slots are reused"
    );
    assert_eq!(shard.offloads(), vec![1, 2, 1, 2]);
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn running_adapters_are_never_evicted() {
    // Two slots, a tight byte budget, lots of adapters and requests: loads, evictions and rotations interleave with
    // running batches; the fake shard flags any offload of a slot in use.
    let shard = shard(2, 25, 1);
    let backend = start(&shard, &config(2, 15, Some(3))).await;
    let names = ["a", "b", "c", "d", "e", "f"];
    let requests = (0..36).map(|i| {
        let name = names[(i * 7) % names.len()];
        let spec = if i % 5 == 0 {
            merge(&[name, "a"], Strategy::Linear)
        } else {
            single(name)
        };
        run(&backend, request(spec, 2, 1 + (i % 4) as u32))
    });
    for (r, _) in join_all(requests).await {
        r.expect("every request completes");
    }
    assert!(shard.offloads().len() > 4, "evictions happened");
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
    assert!(
        shard.max_distinct_adapters() <= 2,
        "cap of distinct adapters per batch"
    );
}

#[tokio::test]
async fn an_adapter_that_does_not_fit_is_skipped_not_waited_for() {
    // 100 bytes: x (60) runs; big (60) cannot fit until x is done; small (30) can.
    let shard = shard(4, 100, 4);
    let backend = start(&shard, &config(128, 60_000, None)).await;
    let x = run(&backend, request(single("x"), 2, 40));
    let rest = async {
        until("x resident", || shard.resident().values().any(|l| l == "x")).await;
        let big = run(&backend, request(single("big"), 2, 1));
        let small = async {
            until("big tried", || {
                shard.load_labels().contains(&"big".to_string())
            })
            .await;
            run(&backend, request(single("small"), 2, 1)).await
        };
        tokio::join!(big, small)
    };
    let ((x, x_done), ((big, big_done), (small, small_done))) = tokio::join!(x, rest);
    assert_eq!(x.expect("x"), text("x", 40));
    assert_eq!(small.expect("small"), text("small", 1));
    assert_eq!(big.expect("big"), text("big", 1));
    assert!(small_done < x_done, "small ran while big waited for room");
    assert!(big_done > x_done, "big needed x's bytes");
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn busy_adapters_do_not_starve_others() {
    // One adapter per batch; a has a long backlog, b one request that arrives later. After a's
    // turn (30 ms) it stops taking new requests, b runs, then a resumes.
    let shard = shard(4, 1000, 2);
    let backend = start(&shard, &config(1, 30, Some(4))).await;
    let a_requests = join_all((0..40).map(|_| run(&backend, request(single("a"), 2, 5))));
    let b_request = async {
        until("a running", || !shard.prefills().is_empty()).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        run(&backend, request(single("b"), 2, 2)).await
    };
    let (a_results, (b, b_done)) = tokio::join!(a_requests, b_request);
    assert_eq!(b.expect("b"), text("b", 2));
    let a_after_b = a_results
        .iter()
        .filter(|(r, done)| r.is_ok() && *done > b_done)
        .count();
    assert!(
        a_after_b >= 10,
        "b waited for a's backlog: only {a_after_b} of a's 40 requests finished after it"
    );
    assert_eq!(shard.max_distinct_adapters(), 1);
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn one_slot_rotates_between_busy_adapters() {
    let shard = shard(1, 1000, 1);
    let backend = start(&shard, &config(128, 20, Some(2))).await;
    let jobs = (0..30).map(|i| {
        let name = if i % 2 == 0 { "a" } else { "b" };
        run(&backend, request(single(name), 2, 3))
    });
    let results = join_all(jobs).await;
    let first_done = |parity: usize| {
        results
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, (_, t))| *t)
            .min()
    };
    let last_done = |parity: usize| {
        results
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, (_, t))| *t)
            .max()
    };
    for (r, _) in &results {
        r.as_ref().expect("completes");
    }
    assert!(
        first_done(1) < last_done(0) && first_done(0) < last_done(1),
        "neither adapter waited for the other's whole backlog"
    );
    assert!(
        shard.loads().len() >= 3,
        "the slot rotated: {:?}",
        shard.load_labels()
    );
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn admission_is_limited_and_answers_429() {
    let shard = shard(4, 1000, 0);
    let cfg = config(128, 2000, None);
    let backend: Arc<dyn Backend> = start(&shard, &cfg).await;
    let limits = crate::config::Limits {
        max_concurrent_requests: 2,
        ..test_limits()
    };
    let infer = Infer::new(
        backend,
        Validation::new(word_tokenizer(), limits).expect("workers"),
    );
    let req = || GenerateRequest {
        inputs: "hello world".into(),
        parameters: GenerateParameters {
            adapter_id: Some("a".into()),
            max_new_tokens: Some(2),
            ..Default::default()
        },
    };
    shard.hold("a");
    let first = infer.generate(req());
    let second = infer.generate(req());
    let third = async {
        until("both requests admitted", || !shard.loads().is_empty()).await;
        let r = infer.generate(req()).await;
        shard.release("a");
        r
    };
    let (first, second, third) = tokio::join!(first, second, third);
    assert!(matches!(third, Err(InferError::Overloaded)), "{third:?}");
    assert_eq!(third.err().map(|e| e.http_status().as_u16()), Some(429));
    assert_eq!(first.expect("first").generated_text.text, text("a", 2));
    assert_eq!(second.expect("second").generated_text.text, text("a", 2));
}

#[tokio::test]
async fn adapters_are_refused_when_the_shards_have_no_slots() {
    let shard = shard(0, 0, 0);
    let backend = start(&shard, &config(128, 2000, None)).await;
    let err = backend
        .schedule(request(single("a"), 2, 1))
        .expect_err("refused at once");
    assert!(matches!(
        err,
        InferError::Validation(ValidationError::AdaptersDisabled)
    ));
    let (base, _) = run(&backend, request(AdapterSpec::Base, 2, 1)).await;
    assert_eq!(base.expect("base"), text("base", 1));
}

#[tokio::test]
async fn concurrent_first_loads_never_overcommit_the_shards() {
    // Four adapters never seen before, 10 bytes each, a 30-byte budget, all requested at once:
    // the router learns each size from its prepare and installs only what fits, so the shards
    // never refuse an install (the fake shard records any over-budget install as a violation).
    let shard = shard(8, 30, 2);
    let backend = start(&shard, &config(128, 2000, None)).await;
    four_loads_at_once_fit_30_bytes(&shard, &backend).await;
    assert_eq!(shard.loads().len(), 4, "one prepare each, no retries");
    assert_eq!(shard.staged(), 0, "nothing left staged");
}

#[tokio::test]
async fn the_budget_a_shard_fits_at_warmup_is_the_one_kept() {
    // A GPU shard caps its adapter budget to the memory the warm-up step left (1000 bytes
    // before, 30 after): the router plans with the budget it reports after the warm-up, so
    // four 10-byte adapters requested at once never over-commit it.
    let shard = FakeShard::new(FakeShardConfig {
        slots: 8,
        budget: 1000,
        warmup_budget: Some(30),
        step_delay: Duration::from_millis(2),
        adapters: adapters(&["a", "b", "c", "d"]),
        ..Default::default()
    });
    let backend = start(&shard, &config(128, 2000, None)).await;
    assert_eq!(backend.info().adapter_memory_bytes, 30);
    four_loads_at_once_fit_30_bytes(&shard, &backend).await;
}

/// Requests on four 10-byte adapters `a`..`d` at once all succeed, and the shard never held
/// more than its 30-byte budget (no install over it: no violation).
async fn four_loads_at_once_fit_30_bytes(
    shard: &FakeShard,
    backend: &Arc<ShardBackend<FakeShard>>,
) {
    let names = ["a", "b", "c", "d"];
    let results = join_all(names.iter().map(|n| run(backend, request(single(n), 2, 6)))).await;
    for (name, (result, _)) in names.iter().zip(results) {
        assert_eq!(result.expect(name), text(name, 6));
    }
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
    assert_eq!(shard.max_used_bytes(), 30, "exactly three fit at once");
}

#[tokio::test]
async fn preloads_pin_and_unloads_go_through_the_loader() {
    use super::adapters::{AdapterState, AdminError};
    let shard = shard(2, 1000, 0);
    let backend = start(&shard, &config(128, 2000, None)).await;
    let view = backend
        .preload(single("a"), true, true)
        .await
        .expect("preloaded");
    assert_eq!(view.state, AdapterState::Resident);
    assert_eq!(
        (view.slot, view.bytes, view.pinned),
        (Some(1), Some(10), true)
    );
    // Other adapters take turns in the one unpinned slot; the pinned one stays.
    for name in ["b", "c", "d", "a"] {
        let (r, _) = run(&backend, request(single(name), 2, 1)).await;
        assert_eq!(r.expect(name), text(name, 1));
    }
    assert_eq!(shard.install_slots(), vec![1, 2, 2, 2]);
    assert_eq!(shard.offloads(), vec![2, 2]);
    // Not waiting: answers at once, loading.
    let early = backend
        .preload(single("e"), false, false)
        .await
        .expect("accepted");
    assert_ne!(early.state, AdapterState::Resident);
    until("e resident", || shard.resident().values().any(|v| v == "e")).await;
    // Unload by key prefix: the slot is offloaded on the shards.
    let key = single("a").key().hex();
    let gone = backend.unload(&key[..10]).expect("unloaded");
    assert_eq!((gone.state, gone.pinned), (AdapterState::Evicted, false));
    until("slot 1 offloaded", || shard.offloads().contains(&1)).await;
    let residency = backend.residency().expect("residency");
    assert_eq!(residency.used_bytes, 10, "only e remains");
    // A missing adapter fails the preload with the request error.
    let missing = backend.preload(single("nope"), false, true).await;
    assert!(
        matches!(
            missing,
            Err(AdminError::Load(InferError::AdapterNotFound(_)))
        ),
        "{missing:?}"
    );
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}
