//! The engine over the paged KV cache: chunked prefill, prefix-cache hits and preemption give
//! the tokens and logprobs of the plain path, for the base model, a PEFT adapter and a TIES
//! merge (the tiny fixture model in f32).
//!
//! Tolerance: 1e-5 on logprobs. The paths differ only in how attention is split into tiles
//! and chunks (the same f32 products summed in another order) and in which step computed a
//! key; on this model's O(1) activations that moves logprobs by ~1e-6.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use medley_hub::HubSettings;
use medley_merge::{MergeSpec, SignMethod, Strategy};
use medley_shard::adapters::{
    AdapterLoader, AdapterSettings, AdapterStore, BaseModules, LoraBackend,
};
use medley_shard::engine::{
    Batch, CachedBatch, Engine, EngineInfo, Request, SamplingParams, StopParams, TextContext,
    WarmupParams,
};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{LlamaModel, LoadOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

const ADAPTERS: [&str; 3] = ["strong_a_r8", "strong_b_r8_attn", "strong_c_r8_rslora"];

/// Slot 1: one PEFT adapter; slot 2: a TIES merge of three.
fn store(model: &LlamaModel) -> AdapterStore {
    let mut settings = AdapterSettings::new(HubSettings::from_vars(None, |_| None));
    settings.roots = vec![fixtures().join("adapters")];
    settings.merge_threads = 1;
    let loader = AdapterLoader::new(
        &settings,
        BaseModules::from_config(model.config()),
        &Device::Cpu,
    )
    .unwrap();
    let source = |id: &str| loader.sources().resolve_local(id).unwrap();
    let mut store = AdapterStore::new(4, 1 << 30, LoraBackend::Kernels);
    let single = loader.build(&[source(ADAPTERS[0])], None).unwrap();
    store.install(1, single.adapter).unwrap();
    let ties = MergeSpec::new(Strategy::Ties, vec![1.0, 0.6, -0.3])
        .with_density(0.5)
        .with_sign_method(SignMethod::Total);
    let sources: Vec<_> = ADAPTERS.iter().map(|id| source(id)).collect();
    store
        .install(2, loader.build(&sources, Some(&ties)).unwrap().adapter)
        .unwrap();
    // An adapter without q, k or o (v and the MLP only): a stacked q/k/v call then has slots
    // with and without factors for each part.
    let partial = loader.build(&[source(ADAPTERS[2])], None).unwrap();
    store.install(3, partial.adapter).unwrap();
    store
}

/// An engine whose steps compute at most `step_tokens` prompt tokens.
fn engine(kv_tokens: usize, block: usize, prefix: bool, step_tokens: u32) -> Engine {
    engine_with(kv_tokens, block, prefix, step_tokens, 0)
}

/// An engine whose steps compute at most `step_tokens` prompt tokens while sequences decode
/// in them, `idle_tokens` when none does.
fn engine_with(
    kv_tokens: usize,
    block: usize,
    prefix: bool,
    step_tokens: u32,
    idle_tokens: u32,
) -> Engine {
    engine_loaded(
        kv_tokens,
        block,
        prefix,
        (step_tokens, idle_tokens),
        &LoadOptions::default(),
    )
}

/// [`engine_with`] over the model loaded with `opts`.
fn engine_loaded(
    kv_tokens: usize,
    block: usize,
    prefix: bool,
    (step_tokens, idle_tokens): (u32, u32),
    opts: &LoadOptions,
) -> Engine {
    let dir = fixtures().join("tiny-llama");
    let model = LlamaModel::load(&dir, opts).unwrap();
    let cfg = model.config().clone();
    let kv = KvCache::new(
        model.kv_config(),
        model.dtype(),
        model.device(),
        KvCacheConfig {
            capacity_tokens: kv_tokens,
            block_tokens: block,
            prefix_caching: prefix,
        },
    )
    .unwrap();
    let adapters = store(&model);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut e = Engine::new(
        model,
        kv,
        TextContext::new(tokenizer, cfg.eos_token_ids.clone()),
        EngineInfo {
            model_id: "tiny".into(),
            rank: 0,
            world_size: 1,
        },
        adapters,
    );
    e.warmup(&WarmupParams {
        max_input_tokens: step_tokens,
        max_prefill_tokens: step_tokens,
        max_idle_prefill_tokens: idle_tokens,
    })
    .unwrap();
    e
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 37 + seed * 101) % 500)
        .collect()
}

fn request(id: u64, input_ids: Vec<u32>, slot: u32, new: u32, logprobs: bool) -> Request {
    Request {
        id,
        input_ids,
        sampling: SamplingParams::default(),
        stopping: StopParams {
            max_new_tokens: new,
            ignore_eos_token: true,
            ..Default::default()
        },
        prefill_logprobs: logprobs,
        top_n_tokens: 0,
        adapter_slot: slot,
    }
}

/// What a request produced: generated ids, their logprobs, prompt logprobs, cached tokens.
#[derive(Debug, Default, Clone)]
struct Output {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    prompt_logprobs: Vec<f32>,
    cached: Option<u32>,
    /// Step index of each generated token.
    steps: Vec<usize>,
}

/// Drives the engine: `arrivals[k]` joins (as a new batch, with the running batch) at step
/// `k`'s position in the list; returns every request's output and the steps that saw a
/// preempted request.
struct Driver {
    outputs: HashMap<u64, Output>,
    running: Option<CachedBatch>,
    step: usize,
    preempted_steps: usize,
}

impl Driver {
    fn new() -> Self {
        Self {
            outputs: HashMap::new(),
            running: None,
            step: 0,
            preempted_steps: 0,
        }
    }

    fn absorb(&mut self, r: medley_shard::engine::StepResponse) {
        for g in r.generations {
            let o = self.outputs.entry(g.request_id).or_default();
            if let Some(p) = g.prefill_tokens {
                o.prompt_logprobs = p.logprobs;
            }
            if g.cached_tokens.is_some() {
                o.cached = g.cached_tokens;
            }
            o.ids.extend(&g.tokens.ids);
            o.logprobs.extend(&g.tokens.logprobs);
            o.steps.push(self.step);
        }
        if r.batch.as_ref().is_some_and(|b| b.preempted > 0) {
            self.preempted_steps += 1;
        }
        self.running = r.batch;
        self.step += 1;
    }

    fn join(&mut self, e: &mut Engine, batch_id: u64, requests: Vec<Request>) {
        let running = self.running.take().into_iter().collect();
        let r = e
            .prefill(
                Batch {
                    id: batch_id,
                    requests,
                    max_tokens: 0,
                },
                running,
            )
            .unwrap();
        self.absorb(r);
    }

    fn decode(&mut self, e: &mut Engine) -> bool {
        let Some(b) = self.running.take() else {
            return false;
        };
        let r = e.decode(vec![b]).unwrap();
        self.absorb(r);
        true
    }

    fn finish(&mut self, e: &mut Engine) {
        while self.decode(e) {}
    }
}

fn assert_same(a: &Output, b: &Output, what: &str) {
    assert_eq!(a.ids, b.ids, "{what}: tokens");
    for (name, x, y) in [
        ("logprobs", &a.logprobs, &b.logprobs),
        ("prompt logprobs", &a.prompt_logprobs, &b.prompt_logprobs),
    ] {
        assert_eq!(x.len(), y.len(), "{what}: {name}");
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let same = (p.is_nan() && q.is_nan()) || (p - q).abs() <= 1e-5;
            assert!(same, "{what}: {name}[{i}] {p} vs {q}");
        }
    }
}

/// Base, adapter and merge requests (one with prompt logprobs).
fn mixed_requests(first_id: u64) -> Vec<Request> {
    vec![
        request(first_id, prompt(1, 45), 0, 6, true),
        request(first_id + 1, prompt(2, 38), 1, 6, false),
        request(first_id + 2, prompt(3, 51), 2, 6, true),
    ]
}

fn run_alone(e: &mut Engine, requests: Vec<Request>) -> HashMap<u64, Output> {
    let mut d = Driver::new();
    d.join(e, 1, requests);
    d.finish(e);
    d.outputs
}

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
/// the 8th chunk, and that both equal the same requests run alone unchunked.
fn a_prompt_joins_a_decoding_stream(
    e: &mut Engine,
    first_len: usize,
    slot2: u32,
    first_steps: std::ops::Range<usize>,
) {
    let mut d = Driver::new();
    let first = || request(1, prompt(5, first_len), 0, 30, false);
    let second = || request(2, prompt(6, 60), slot2, 4, false);
    d.join(e, 1, vec![first()]);
    d.decode(e);
    d.join(e, 2, vec![second()]);
    for _ in 0..7 {
        d.decode(e);
    }
    assert_eq!(
        d.outputs[&1].steps,
        first_steps.collect::<Vec<_>>(),
        "one token every step"
    );
    assert_eq!(
        d.outputs[&2].steps,
        vec![9],
        "first token after the 8th chunk"
    );
    d.finish(e);
    let mut plain = engine(4096, 16, false, 4096);
    let alone1 = run_alone(&mut plain, vec![first()]);
    let alone2 = run_alone(&mut plain, vec![second()]);
    assert_same(&alone1[&1], &d.outputs[&1], "decoding stream");
    assert_same(&alone2[&2], &d.outputs[&2], "chunked prompt");
}

#[test]
fn running_streams_keep_decoding_while_a_long_prompt_is_chunked() {
    // A 6-token prompt gives its first token in step 0.
    a_prompt_joins_a_decoding_stream(&mut engine(4096, 16, false, 8), 6, 1, 0..10);
}

#[test]
fn a_step_without_decodes_takes_the_idle_budget() {
    // Alone, a 60-token prompt takes 40 tokens, then 20: its first token comes in step 1;
    // once it decodes, the joining prompt gets the busy budget of 8 tokens a step.
    a_prompt_joins_a_decoding_stream(&mut engine_with(4096, 16, false, 8, 40), 60, 2, 1..10);
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
    for prefix in [false, true] {
        let mut tight = engine(128, 8, prefix, 4096);
        let mut d = Driver::new();
        d.join(&mut tight, 1, reqs());
        d.finish(&mut tight);
        assert!(d.preempted_steps > 0, "the pool never ran out");
        for id in 100..106 {
            assert_same(
                &want[&id],
                &d.outputs[&id],
                &format!("request {id} (prefix {prefix})"),
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
