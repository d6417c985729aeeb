//! Batching-loop tests against the fake shard's paged-KV behaviour: new requests join the
//! running batch in one prefill step that also decodes it, chunked prompts get their tokens
//! once their prefill is done, no request joins while one is preempted, and the prefix cache's
//! `cached_tokens` reach the end event and the metrics. The fake shard flags any join that
//! breaks its rules (preempted requests, pending prompt tokens over the step budget).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medley_proto::shard::v1 as pb;

use super::batcher::{LoopConfig, admission};
use super::testing::{BLOCK_TOKENS, Call, FakeShard, FakeShardConfig, TOTAL_BLOCKS, request};
use super::{Backend, ShardBackend};
use crate::config::RouterConfig;
use crate::infer::testing::{test_config, test_limits};
use crate::infer::{AdapterSpec, InferStreamResponse, ValidGenerateRequest};

fn shard(step_ms: u64, cached_tokens: u32) -> FakeShard {
    FakeShard::new(FakeShardConfig {
        step_delay: Duration::from_millis(step_ms),
        cached_tokens,
        ..Default::default()
    })
}

fn config(max_batch_prefill_tokens: u32) -> RouterConfig {
    let mut c = test_config(test_limits(), PathBuf::new());
    c.batching.max_batch_prefill_tokens = max_batch_prefill_tokens;
    c
}

async fn start(shard: &FakeShard, cfg: &RouterConfig) -> Arc<ShardBackend<FakeShard>> {
    Arc::new(
        ShardBackend::start(shard.clone(), cfg)
            .await
            .expect("backend starts"),
    )
}

/// What a request received.
#[derive(Debug, Default)]
struct Outcome {
    /// Generated tokens (the end's included).
    tokens: usize,
    text: String,
    cached_tokens: Option<u32>,
}

/// Runs a request to its end (request ids are given in scheduling order, from 0).
async fn run(backend: &ShardBackend<FakeShard>, req: ValidGenerateRequest) -> Outcome {
    let mut rx = backend.schedule(req).expect("scheduled");
    let mut out = Outcome::default();
    let collect = async {
        while let Some(event) = rx.recv().await {
            match event.expect("no error") {
                InferStreamResponse::Prefill(_) => {}
                InferStreamResponse::Intermediate { .. } => out.tokens += 1,
                InferStreamResponse::End {
                    generated_text,
                    cached_tokens,
                    ..
                } => {
                    out.tokens += 1;
                    out.text = generated_text.text;
                    out.cached_tokens = cached_tokens;
                    return;
                }
            }
        }
        panic!("the request ended without its end event");
    };
    tokio::time::timeout(Duration::from_secs(20), collect)
        .await
        .expect("request did not finish in 20 s");
    out
}

/// Waits (at most 10 s) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The index of the call that started request `id`.
fn join_of(calls: &[Call], id: u64) -> usize {
    calls
        .iter()
        .position(|c| c.new.contains(&id))
        .unwrap_or_else(|| panic!("request {id} never started: {calls:#?}"))
}

#[tokio::test]
async fn new_requests_join_the_running_batch_in_one_step() {
    let shard = shard(2, 0);
    let backend = start(&shard, &config(4096)).await;
    let a = run(&backend, request(AdapterSpec::Base, 2, 30));
    let b = async {
        until("a runs", || !shard.calls().is_empty()).await;
        run(&backend, request(AdapterSpec::Base, 3, 4)).await
    };
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.tokens, a.text), (30, " base".repeat(30)));
    assert_eq!((b.tokens, b.text), (4, " base".repeat(4)));
    let calls = shard.calls();
    let join = join_of(&calls, 1);
    // One prefill step started b and decoded a (batch 0, its first), and kept a's batch id.
    let step = &calls[join];
    assert_eq!(
        (step.method, &step.batches, &step.generated),
        ("prefill", &vec![0], &vec![0, 1]),
        "{calls:#?}"
    );
    let next = &calls[join + 1];
    assert_eq!((next.method, &next.batches), ("decode", &vec![0]));
    assert_eq!(
        next.generated,
        vec![0, 1],
        "both decode in the merged batch"
    );
    // Never a separate decode of the new batch, nor a step without a: one token per step.
    assert!(
        calls
            .iter()
            .all(|c| c.method == "prefill" || c.batches.len() == 1)
    );
    assert_eq!(
        calls.iter().filter(|c| c.generated.contains(&0)).count(),
        30
    );
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn a_chunked_prompt_gets_its_tokens_once_its_prefill_is_done() {
    // 8 prompt tokens per step: b's 20-token prompt takes three steps (8 + 8 + 4) while a
    // keeps decoding; c (4 tokens) cannot join while b's prompt fills the step budget.
    let shard = shard(2, 0);
    let backend = start(&shard, &config(8)).await;
    let a = run(&backend, request(AdapterSpec::Base, 2, 30));
    let b = async {
        until("a runs", || !shard.calls().is_empty()).await;
        run(&backend, request(AdapterSpec::Base, 20, 3)).await
    };
    let c = async {
        until("b started", || shard.calls().iter().any(|c| c.new == [1])).await;
        run(&backend, request(AdapterSpec::Base, 4, 2)).await
    };
    let (a, b, c) = tokio::join!(a, b, c);
    assert_eq!(a.tokens, 30);
    assert_eq!((b.tokens, b.text), (3, " base".repeat(3)));
    assert_eq!(c.tokens, 2);
    let calls = shard.calls();
    let join = join_of(&calls, 1);
    let first_token = |id: u64| {
        calls
            .iter()
            .position(|c| c.generated.contains(&id))
            .expect("a token")
    };
    assert_eq!(first_token(1), join + 2, "{calls:#?}");
    assert_eq!(
        calls[join..join + 2]
            .iter()
            .map(|c| c.pending)
            .collect::<Vec<_>>(),
        vec![12, 4],
        "b's prompt still to prefill after each chunk"
    );
    for step in &calls[join..=join + 2] {
        assert!(step.generated.contains(&0), "a decoded meanwhile: {step:?}");
    }
    assert!(join_of(&calls, 2) > join + 1, "c waited for b's chunks");
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn requests_queued_in_the_router_count_in_the_shards_step_budget() {
    // Six streams decode (busy budget 8); five 20-token prompts arrive at once. The router
    // admits them by a budget that counts its queue ((6 + 5) x 2 = 22 tokens: two join), so
    // it must tell the shards the three it still holds, or their step would take only
    // (6 + 2) x 2 = 16 tokens (a violation).
    let shard = shard(2, 0);
    let backend = start(&shard, &config(8)).await;
    let streams =
        futures::future::join_all((0..6).map(|_| run(&backend, request(AdapterSpec::Base, 2, 40))));
    let burst = async {
        until("six decode", || {
            shard.calls().iter().any(|c| c.generated.len() == 6)
        })
        .await;
        let runs = (0..5).map(|_| run(&backend, request(AdapterSpec::Base, 20, 2)));
        futures::future::join_all(runs).await
    };
    let (streams, burst) = tokio::join!(streams, burst);
    assert!(streams.iter().all(|o| o.tokens == 40));
    assert!(burst.iter().all(|o| o.tokens == 2));
    let calls = shard.calls();
    assert!(calls.iter().any(|c| c.queued > 0), "{calls:#?}");
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn no_request_joins_while_one_is_preempted() {
    let shard = shard(2, 0);
    let backend = start(&shard, &config(4096)).await;
    let a = run(&backend, request(AdapterSpec::Base, 2, 40));
    let b = async {
        until("a runs", || !shard.calls().is_empty()).await;
        shard.preempt(10);
        until("a preempted", || {
            shard.calls().iter().any(|c| c.preempted > 0)
        })
        .await;
        run(&backend, request(AdapterSpec::Base, 2, 2)).await
    };
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.tokens, b.tokens), (40, 2), "a resumed, b ran");
    let calls = shard.calls();
    let last_preempted = calls
        .iter()
        .rposition(|c| c.preempted > 0)
        .expect("a was preempted");
    assert!(join_of(&calls, 1) > last_preempted, "{calls:#?}");
    let preempted = calls.iter().filter(|c| c.preempted > 0).count();
    assert_eq!(preempted, 10);
    assert_eq!(
        calls.iter().filter(|c| c.generated.contains(&0)).count(),
        40
    );
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
}

#[tokio::test]
async fn prefix_cached_tokens_reach_the_end_event_and_the_metrics() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    // The test runtime runs every task on this thread: the loop records into this recorder.
    let _local = metrics::set_default_local_recorder(&recorder);
    let shard = shard(0, 16);
    let backend = start(&shard, &config(4096)).await;
    let out = run(&backend, request(AdapterSpec::Base, 40, 3)).await;
    assert_eq!(out.cached_tokens, Some(16));
    let short = run(&backend, request(AdapterSpec::Base, 4, 1)).await;
    assert_eq!(
        short.cached_tokens,
        Some(3),
        "the last prompt token is computed"
    );
    let kv = backend.kv_blocks().expect("the steps reported the pool");
    assert_eq!(
        (kv.block_tokens, kv.total_blocks),
        (BLOCK_TOKENS, TOTAL_BLOCKS)
    );
    assert_eq!(kv.used_blocks, 0, "nothing runs");
    assert_eq!(kv.cached_blocks, 2, "one block of each finished prompt");
    let text = metrics.render();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(value("medley_prefix_cache_hit_tokens_total"), 19.0);
    assert_eq!(value("medley_prefill_computed_tokens_total"), 25.0);
    assert_eq!(value("medley_kv_cache_cached_blocks"), 2.0);
    assert_eq!(value("medley_requests_preempted"), 0.0);
    assert_eq!(value("medley_kv_cache_utilization"), 0.0);
}

#[tokio::test]
async fn a_batch_token_budget_over_the_kv_capacity_is_accepted() {
    // The shards preempt and recompute when their pool runs out: over-committing is allowed.
    let capacity = BLOCK_TOKENS * TOTAL_BLOCKS;
    let mut cfg = config(512);
    cfg.batching.max_batch_total_tokens = Some(2 * capacity);
    let backend = start(&shard(0, 0), &cfg).await;
    assert_eq!(backend.info().max_batch_total_tokens, 2 * capacity);
    let out = run(&backend, request(AdapterSpec::Base, 2, 2)).await;
    assert_eq!(out.tokens, 2);
}

fn loop_config(prefill: u32, max_batch_size: Option<usize>) -> LoopConfig {
    let mut batching = config(prefill).batching;
    batching.max_batch_size = max_batch_size;
    LoopConfig {
        batching,
        max_batch_total_tokens: 1000,
    }
}

fn running(size: u32, pending: u32, preempted: u32) -> pb::CachedBatch {
    pb::CachedBatch {
        id: 0,
        request_ids: (0..u64::from(size)).collect(),
        size,
        max_tokens: 300,
        current_tokens: 0,
        pending_tokens: pending,
        preempted,
        queued: 0,
        prefilling: 0,
    }
}

#[test]
fn admission_leaves_the_step_budget_to_pending_prompts_and_waits_for_preempted_ones() {
    let cfg = loop_config(512, Some(8));
    let idle = admission(&cfg, None, 0, 0).expect("idle: the whole budget");
    assert_eq!((idle.prefill_tokens, idle.total_tokens), (512, 1000));
    let free = admission(&cfg, Some(&running(2, 0, 0)), 1, 0).expect("nothing pending");
    assert_eq!((free.prefill_tokens, free.total_tokens), (512, 700));
    assert_eq!(free.max_size, Some(6));
    let chunking = admission(&cfg, Some(&running(2, 500, 0)), 1, 0).expect("12 tokens left");
    assert_eq!(chunking.prefill_tokens, 12);
    assert!(
        admission(&cfg, Some(&running(2, 512, 0)), 1, 0).is_none(),
        "budget spent"
    );
    assert!(
        admission(&cfg, Some(&running(2, 900, 0)), 1, 0).is_none(),
        "budget spent"
    );
    assert!(
        admission(&cfg, Some(&running(2, 0, 1)), 1, 0).is_none(),
        "preempted"
    );
    assert!(
        admission(&cfg, Some(&running(8, 0, 0)), 1, 0).is_none(),
        "full"
    );
    // The waiting-served ratio (0.3) holds new requests back for a while.
    let held = admission(&cfg, Some(&running(7, 0, 0)), 1, 0).expect("room for one");
    assert_eq!(held.min_size, Some(2));
    let forced = admission(&cfg, Some(&running(7, 0, 0)), 20, 0).expect("waited enough");
    assert_eq!(forced.min_size, None);
}

#[test]
fn with_nothing_running_new_requests_get_the_idle_budget() {
    let mut cfg = loop_config(32, None);
    assert_eq!(
        admission(&cfg, None, 0, 0).map(|b| b.prefill_tokens),
        Some(512)
    );
    cfg.batching.max_idle_prefill_tokens = Some(100);
    assert_eq!(
        admission(&cfg, None, 0, 0).map(|b| b.prefill_tokens),
        Some(100)
    );
    let busy = admission(&cfg, Some(&running(2, 0, 0)), 1, 0).expect("room");
    assert_eq!(busy.prefill_tokens, 32, "requests decode: the busy budget");
    let many = admission(&cfg, Some(&running(40, 0, 0)), 1, 0).expect("room");
    assert_eq!(
        many.prefill_tokens, 80,
        "two prompt rows per running request"
    );
    let most = admission(&cfg, Some(&running(90, 30, 0)), 1, 0).expect("room");
    assert_eq!(most.prefill_tokens, 70, "at most the idle budget");
    let queued = admission(&cfg, Some(&running(30, 0, 0)), 1, 3).expect("room");
    assert_eq!(
        queued.prefill_tokens, 72,
        "two prompt rows per request, queued ones included, times 33 / 30"
    );
    let burst = admission(&cfg, Some(&running(10, 0, 0)), 1, 30).expect("room");
    assert_eq!(
        burst.prefill_tokens, 100,
        "more wait than decode: the idle budget"
    );
    let mut prefilling = running(30, 0, 0);
    prefilling.prefilling = 16;
    let shard_side = admission(&cfg, Some(&prefilling), 1, 0).expect("room");
    assert_eq!(
        shard_side.prefill_tokens, 100,
        "16 of 30 wait for their first token in the shards"
    );
    // With the default ratio (0) a lone newcomer joins a large batch at once.
    cfg.batching.waiting_served_ratio = 0.0;
    let lone = admission(&cfg, Some(&running(16, 0, 0)), 1, 0).expect("room");
    assert_eq!(lone.min_size, None);
}

#[tokio::test]
async fn a_refused_new_request_fails_alone_and_the_running_batch_goes_on() {
    let shard = shard(2, 0);
    let backend = start(&shard, &config(4096)).await;
    let a = run(&backend, request(AdapterSpec::Base, 2, 20));
    let b = async {
        until("a runs", || !shard.calls().is_empty()).await;
        // No new tokens: the shard refuses it (INVALID_ARGUMENT) when it joins.
        let mut rx = backend
            .schedule(request(AdapterSpec::Base, 3, 0))
            .expect("scheduled");
        rx.recv().await
    };
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.tokens, a.text), (20, " base".repeat(20)));
    let err = b.expect("an event").expect_err("refused");
    assert!(err.to_string().contains("max_new_tokens"), "{err}");
}
