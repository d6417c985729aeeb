//! The engine over the paged KV cache: chunked prefill, prefix-cache hits and preemption give
//! the tokens and logprobs of the plain path, for the base model, a PEFT adapter and a TIES
//! merge (the tiny fixture model in f32).
//!
//! Tolerance: 1e-5 on logprobs. The paths differ only in how attention is split into tiles
//! and chunks (the same f32 products summed in another order) and in which step computed a
//! key; on this model's O(1) activations that moves logprobs by ~1e-6.

#![allow(clippy::unwrap_used)]

mod engine_harness;

use engine_harness::*;
use medley_shard::engine::{Batch, Engine};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{LlamaModel, LoadOptions};

#[test]
fn chunked_prefill_matches_one_step_prefill() {
    let whole = run_alone(&mut engine(4096, 16, false, 4096), mixed_requests(10));
    let mut small = engine(4096, 16, false, 7);
    let chunked = run_alone(&mut small, mixed_requests(10));
    for id in 10..13 {
        assert_same(&whole[&id], &chunked[&id], &format!("request {id}"));
        assert_eq!(whole[&id].prompt_logprobs.len() > 1, id != 11);
    }
    // 134 prompt tokens at 7 a step: the last first token comes after 20 steps.
    assert_eq!(chunked[&12].steps[0], 134usize.div_ceil(7) - 1);
}

/// Steps whose sequences only need the argmax (greedy, no penalty, no alternatives) let the
/// device choose the tokens (`model::device_greedy`), reading back two words a row instead of
/// the logits. The engine's test switch makes those choices on the host here (the CPU has no
/// such kernel), so the path that hands them to the sequences runs without a GPU: the same
/// tokens and logprobs as the samplers give. Steps with prompt-logprob rows keep the logits.
#[test]
fn device_choices_give_the_samplers_tokens() {
    let sampled = run_alone(&mut engine(4096, 16, false, 7), mixed_requests(10));
    let before = medley_shard::engine::choose_on_host(true);
    let chosen = run_alone(&mut engine(4096, 16, false, 7), mixed_requests(10));
    let steps = medley_shard::engine::choose_on_host(false) - before;
    // 134 prompt tokens at 7 a step, then 6 tokens each: the last 5 steps decode only.
    assert!(steps >= 5, "{steps} steps took the device-choice path");
    for id in 10..13 {
        assert_same(&sampled[&id], &chosen[&id], &format!("request {id}"));
    }
}

/// q/k/v and gate/up as one matmul each over their stacked weights (`--stack-projections`) give
/// the tokens and logprobs of separate matmuls, for the base model, an adapter, a TIES merge
/// and an adapter with only some of the stacked modules, in one batch and alone: the LoRA deltas
/// of a stacked product's modules go through one call (`LoraDelta::apply_stacked`; on the CPU
/// part by part over copies of the columns). The CPU kernel sums each output in the same order
/// whatever the number of outputs, so the logprobs match to f32 rounding.
#[test]
fn stacked_projections_give_the_same_tokens() {
    let stacked = LoadOptions {
        stack_projections: true,
        ..LoadOptions::default()
    };
    let mut apart = engine(4096, 16, false, 7);
    let mut together = engine_loaded(4096, 16, false, (7, 0), &stacked);
    // Base, a full adapter, a TIES merge and an adapter with only some of the stacked modules,
    // in one batch.
    let batch = || {
        let mut requests = mixed_requests(10);
        requests.push(request(13, prompt(7, 33), 3, 6, true));
        requests
    };
    let want = run_alone(&mut apart, batch());
    let got = run_alone(&mut together, batch());
    for id in 10..14 {
        assert_same(&want[&id], &got[&id], &format!("request {id}"));
    }
    for slot in 0..4 {
        let one = || vec![request(20, prompt(4, 9), slot, 5, true)];
        let (want, got) = (
            run_alone(&mut apart, one()),
            run_alone(&mut together, one()),
        );
        assert_same(&want[&20], &got[&20], &format!("slot {slot} alone"));
    }
}

/// Request 1 (a `first_len`-token prompt, 30 new tokens) starts alone; after one decode step
/// a 60-token prompt on `slot2` joins and is chunked 8 tokens a step while request 1 keeps
/// decoding. Checks request 1's token steps (`first_steps`), request 2's first token after
/// the 8th chunk, and that both equal the same requests run alone unchunked. Driven by `d`:
/// when it runs steps ahead, the step request 2 joins in (step 2) also computes request 1's
/// next token beside the one held from the step ahead, so request 1 gets two tokens in it.
fn a_prompt_joins_a_decoding_stream(
    e: &mut Engine,
    mut d: Driver,
    first_len: usize,
    slot2: u32,
    first_steps: std::ops::Range<usize>,
) {
    let first = || request(1, prompt(5, first_len), 0, 30, false);
    let second = || request(2, prompt(6, 60), slot2, 4, false);
    d.join(e, 1, vec![first()]);
    d.decode(e);
    d.join(e, 2, vec![second()]);
    for _ in 0..7 {
        d.decode(e);
    }
    let mut want: Vec<usize> = first_steps.collect();
    if d.ahead {
        let join = want.iter().position(|&s| s == 2).unwrap();
        want.insert(join, 2);
    }
    assert_eq!(d.outputs[&1].steps, want, "one token every step");
    assert_eq!(
        d.outputs[&2].steps,
        vec![9],
        "first token after the 8th chunk"
    );
    d.finish(e);
    assert_eq!(d.ahead_steps > 0, d.ahead, "steps run ahead");
    let mut plain = engine(4096, 16, false, 4096);
    let alone1 = run_alone(&mut plain, vec![first()]);
    let alone2 = run_alone(&mut plain, vec![second()]);
    assert_same(&alone1[&1], &d.outputs[&1], "decoding stream");
    assert_same(&alone2[&2], &d.outputs[&2], "chunked prompt");
}

#[test]
fn running_streams_keep_decoding_while_a_long_prompt_is_chunked() {
    // A 6-token prompt gives its first token in step 0.
    for d in [Driver::new(), Driver::ahead()] {
        a_prompt_joins_a_decoding_stream(&mut engine(4096, 16, false, 8), d, 6, 1, 0..10);
    }
}

#[test]
fn a_step_without_decodes_takes_the_idle_budget() {
    // Alone, a 60-token prompt takes 40 tokens, then 20: its first token comes in step 1;
    // once it decodes, the joining prompt gets the busy budget of 8 tokens a step.
    for d in [Driver::new(), Driver::ahead()] {
        let mut e = engine_with(4096, 16, false, 8, 40);
        a_prompt_joins_a_decoding_stream(&mut e, d, 60, 2, 1..10);
    }
}

#[test]
fn requests_queued_in_the_router_enlarge_the_step_budget() {
    // Busy budget 8, idle 400: a 60-token prompt joins one decoding stream.
    let pending_after_join = |queued: u32| {
        let mut e = engine_with(4096, 16, false, 8, 400);
        let mut d = Driver::new();
        d.join(&mut e, 1, vec![request(1, prompt(5, 6), 0, 30, false)]);
        d.decode(&mut e);
        if let Some(b) = d.running.as_mut() {
            b.queued = queued;
        }
        d.join(&mut e, 2, vec![request(2, prompt(6, 60), 1, 4, false)]);
        let b = d.running.as_ref().unwrap();
        assert_eq!(b.queued, 0, "shards answer 0");
        b.pending_tokens
    };
    // Alone: 2 requests x 2 rows = 4, so the busy budget of 8 tokens.
    assert_eq!(pending_after_join(0), 52);
    // 20 more wait in the router: 21 wait against 1 decoding, a burst: the idle budget.
    assert_eq!(pending_after_join(20), 0);
}

#[test]
fn cached_prefixes_give_the_cold_results_and_never_cross_adapters() {
    let shared = prompt(7, 40);
    let with_suffix = |s: u32| {
        let mut p = shared.clone();
        p.extend(prompt(s, 9));
        p
    };
    let reqs = |first: u64| {
        vec![
            request(first, with_suffix(1), 0, 5, false),
            request(first + 1, with_suffix(2), 1, 5, false),
            request(first + 2, with_suffix(3), 2, 5, false),
        ]
    };
    let mut cold = engine(4096, 16, false, 4096);
    let mut warm = engine(4096, 16, true, 4096);
    // Warm the cache with the shared prefix under the base model only.
    run_alone(&mut warm, vec![request(1, shared.clone(), 0, 2, false)]);
    let want = run_alone(&mut cold, reqs(10));
    let got = run_alone(&mut warm, reqs(10));
    for id in 10..13 {
        assert_same(&want[&id], &got[&id], &format!("request {id}"));
    }
    // 32 of the 40 shared tokens (two full blocks) under the base model; nothing under the
    // adapter or the merge, whose keys and values differ.
    assert_eq!(got[&10].cached, Some(32));
    assert_eq!(got[&11].cached, Some(0));
    assert_eq!(got[&12].cached, Some(0));
    // Now each adapter's blocks are cached too: the same requests again hit all three.
    let again = run_alone(&mut warm, reqs(20));
    for (k, id) in (20..23).enumerate() {
        assert_eq!(again[&id].cached, Some(48), "request {id}");
        assert_same(
            &want[&(10 + k as u64)],
            &again[&id],
            &format!("request {id}"),
        );
    }
}

#[test]
fn a_full_pool_preempts_and_recomputes_with_the_same_results() {
    let reqs = || {
        (0..6u64)
            .map(|i| {
                request(
                    100 + i,
                    prompt(i as u32, 20 + i as usize),
                    (i % 3) as u32,
                    24,
                    i == 0,
                )
            })
            .collect::<Vec<_>>()
    };
    let mut roomy = engine(4096, 8, false, 4096);
    let want = run_alone(&mut roomy, reqs());
    // Six sequences of up to 49 tokens in a pool of 128: two or three fit at a time.
    for (prefix, ahead) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut tight = engine(128, 8, prefix, 4096);
        let mut d = if ahead {
            Driver::ahead()
        } else {
            Driver::new()
        };
        d.join(&mut tight, 1, reqs());
        d.finish(&mut tight);
        assert!(d.preempted_steps > 0, "the pool never ran out");
        assert_eq!(d.ahead_steps > 0, ahead, "steps run ahead");
        for id in 100..106 {
            assert_same(
                &want[&id],
                &d.outputs[&id],
                &format!("request {id} (prefix {prefix}, ahead {ahead})"),
            );
            assert_eq!(d.outputs[&id].ids.len(), 24);
        }
        assert_eq!(tight.active_sequences(), 0, "every block released");
    }
}

#[test]
fn a_sequence_longer_than_the_pool_fails_cleanly() {
    let mut e = engine(32, 8, true, 4096);
    // The first step computes the 32 prompt tokens that fit; the next cannot go on.
    let first = e
        .prefill(
            Batch {
                id: 1,
                requests: vec![request(1, prompt(1, 40), 0, 4, false)],
                max_tokens: 0,
            },
            vec![],
        )
        .unwrap();
    assert!(first.generations.is_empty());
    let batch = first.batch.unwrap();
    assert_eq!((batch.current_tokens, batch.pending_tokens), (32, 8));
    let err = e.decode(vec![batch]).unwrap_err();
    assert!(err.to_string().contains("cannot hold"), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(e.active_sequences(), 0);
    // The engine still serves what fits.
    let out = run_alone(&mut e, vec![request(2, prompt(2, 20), 0, 4, false)]);
    assert_eq!(out[&2].ids.len(), 4);
}

/// Logits of every prompt row, computed in one step and in 7-token chunks (block size 4, so
/// chunks end inside blocks), for the base model, the adapter and the merge.
#[test]
fn chunked_logits_equal_one_step_logits() {
    use medley_shard::model::{ForwardBatch, SeqChunk};
    let dir = fixtures().join("tiny-llama");
    let model = LlamaModel::load(&dir, &LoadOptions::default()).unwrap();
    let adapters = store(&model);
    let kv_cfg = KvCacheConfig {
        capacity_tokens: 1024,
        block_tokens: 4,
        prefix_caching: false,
    };
    let p = prompt(9, 61);
    for slot in 0..3u32 {
        let run = |chunk: usize| {
            let mut kv =
                KvCache::new(model.kv_config(), model.dtype(), model.device(), kv_cfg).unwrap();
            kv.allocate(1, 64).unwrap();
            let mut rows = vec![];
            for (i, tokens) in p.chunks(chunk).enumerate() {
                let batch = ForwardBatch {
                    chunks: vec![SeqChunk {
                        seq_id: 1,
                        tokens: tokens.to_vec(),
                        start_pos: i * chunk,
                        adapter_slot: slot,
                        all_logits: true,
                    }],
                };
                let logits = model.forward(&batch, &mut kv, &adapters).unwrap();
                rows.extend(logits.to_vec2::<f32>().unwrap());
            }
            rows
        };
        let (whole, chunked) = (run(p.len()), run(7));
        assert_eq!(whole.len(), chunked.len());
        let worst = whole
            .iter()
            .flatten()
            .zip(chunked.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "slot {slot}: logits differ by {worst}");
    }
}

/// Decode ahead (after answering a step the engine runs the kept batch's next decode step
/// before the router asks, see `engine/ahead.rs`) gives the tokens, logprobs and steps of the
/// plain path: chunked prompts with prompt logprobs, an adapter and a TIES merge, each finishing
/// in a step run ahead. (The prompt joining decoding streams and the full pool above run both
/// ways too.)
#[test]
fn steps_run_ahead_give_the_same_results() {
    let want = run_alone(&mut engine(4096, 16, false, 7), mixed_requests(10));
    let mut d = Driver::ahead();
    let mut e = engine(4096, 16, false, 7);
    d.join(&mut e, 1, mixed_requests(10));
    d.finish(&mut e);
    // 134 prompt tokens at 7 a step, then 6 tokens each: the last 5 steps ran ahead.
    assert!(d.ahead_steps >= 5, "{} steps ran ahead", d.ahead_steps);
    for id in 10..13 {
        assert_same(&want[&id], &d.outputs[&id], &format!("request {id}"));
        assert_eq!(want[&id].steps, d.outputs[&id].steps, "request {id}: steps");
    }
}

/// A filter after a step ran ahead drops the removed request's token; a request that finished
/// in that step stays in the batch's handle until its last token is handed over.
#[test]
fn a_filter_after_a_step_run_ahead_drops_the_removed_tokens() {
    let reqs = || {
        vec![
            request(1, prompt(1, 9), 0, 6, false),
            request(2, prompt(2, 7), 1, 2, false),
            request(3, prompt(3, 8), 2, 6, false),
        ]
    };
    let want = run_alone(&mut engine(4096, 16, false, 4096), reqs());
    let mut e = engine(4096, 16, false, 4096);
    let mut d = Driver::ahead();
    // The first tokens; then, ahead, the second ones: request 2's last.
    d.join(&mut e, 1, reqs());
    d.filter(&mut e, &[1, 2]);
    let b = d.running.clone().unwrap();
    assert_eq!(
        b.request_ids,
        vec![1, 2],
        "request 2 ended ahead, 3 removed"
    );
    assert_eq!(e.active_sequences(), 1, "only request 1 holds blocks");
    d.finish(&mut e);
    assert_same(&want[&1], &d.outputs[&1], "request 1");
    assert_same(&want[&2], &d.outputs[&2], "request 2");
    assert_eq!(
        d.outputs[&3].ids,
        want[&3].ids[..1],
        "request 3: its first token only"
    );
    assert_eq!(e.active_sequences(), 0, "every block released");
}

/// A step run ahead that fails (the pool cannot hold the only sequence's next token) fails the
/// call that takes its batch, as that call's own step would have, and frees the sequence.
#[test]
fn a_failed_step_run_ahead_fails_the_next_call() {
    let fails_at = |ahead: bool| {
        // 30 prompt tokens in a 32-token pool: tokens 31 and 32 fit, the third does not.
        let mut e = engine(32, 8, false, 4096);
        let mut d = if ahead {
            Driver::ahead()
        } else {
            Driver::new()
        };
        d.join(&mut e, 1, vec![request(1, prompt(1, 30), 0, 10, false)]);
        let mut calls = 0;
        let err = loop {
            calls += 1;
            let b = d.running.take().unwrap();
            match e.decode(vec![b]) {
                Ok(r) => d.running = r.batch,
                Err(err) => break err,
            }
            if ahead {
                e.decode_ahead();
            }
        };
        assert!(err.to_string().contains("cannot hold"), "{err}");
        assert_eq!(e.active_sequences(), 0);
        calls
    };
    assert_eq!(fails_at(true), fails_at(false));
}
