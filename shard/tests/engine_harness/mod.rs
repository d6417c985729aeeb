//! The engine test harness: the tiny fixture model with adapters in slots, requests, a driver
//! that runs an engine step by step the way the router does, and the comparisons of logits rows.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The largest absolute difference between two equally long rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// First index of the maximum, like `torch.argmax`.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The tiny random Llama fixture.
pub fn tiny() -> PathBuf {
    fixtures().join("tiny-llama")
}

pub const ADAPTERS: [&str; 3] = ["strong_a_r8", "strong_b_r8_attn", "strong_c_r8_rslora"];

/// A loader of the fixture adapters for `model`'s part of the layers (all of them at world
/// size 1), merging on one thread.
pub fn adapter_loader(model: &LlamaModel) -> AdapterLoader {
    let mut settings = AdapterSettings::new(HubSettings::from_vars(None, |_| None));
    settings.roots = vec![fixtures().join("adapters")];
    settings.merge_threads = 1;
    let base = BaseModules::from_config(model.config()).split(model.local_shape());
    AdapterLoader::new(&settings, base, model.device()).unwrap()
}

/// Slot 1: one PEFT adapter; slot 2: a TIES merge of three; slot 3: an adapter without q, k
/// or o.
pub fn store(model: &LlamaModel) -> AdapterStore {
    let loader = adapter_loader(model);
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
pub fn engine(kv_tokens: usize, block: usize, prefix: bool, step_tokens: u32) -> Engine {
    engine_with(kv_tokens, block, prefix, step_tokens, 0)
}

/// An engine whose steps compute at most `step_tokens` prompt tokens while sequences decode
/// in them, `idle_tokens` when none does.
pub fn engine_with(
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
pub fn engine_loaded(
    kv_tokens: usize,
    block: usize,
    prefix: bool,
    (step_tokens, idle_tokens): (u32, u32),
    opts: &LoadOptions,
) -> Engine {
    let model = LlamaModel::load(&tiny(), opts).unwrap();
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
    let mut e = engine_over(model, kv, adapters, 1);
    e.warmup(&WarmupParams {
        max_input_tokens: step_tokens,
        max_prefill_tokens: step_tokens,
        max_idle_prefill_tokens: idle_tokens,
        max_total_tokens: step_tokens,
    })
    .unwrap();
    e
}

/// An engine over `model` (with the tiny fixture's tokenizer), `kv` and `adapters`, as rank 0
/// of `world_size`.
pub fn engine_over(
    model: LlamaModel,
    kv: KvCache,
    adapters: AdapterStore,
    world_size: u32,
) -> Engine {
    let tokenizer = tokenizers::Tokenizer::from_file(tiny().join("tokenizer.json")).unwrap();
    let eos = model.config().eos_token_ids.clone();
    Engine::new(
        model,
        kv,
        TextContext::new(tokenizer, eos),
        EngineInfo {
            model_id: "tiny".into(),
            rank: 0,
            world_size,
            device_ranks: 1,
        },
        adapters,
    )
}

pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 37 + seed * 101) % 500)
        .collect()
}

pub fn request(id: u64, input_ids: Vec<u32>, slot: u32, new: u32, logprobs: bool) -> Request {
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
pub struct Output {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub prompt_logprobs: Vec<f32>,
    pub cached: Option<u32>,
    /// Step index of each generated token.
    pub steps: Vec<usize>,
}

/// Drives the engine: `arrivals[k]` joins (as a new batch, with the running batch) at step
/// `k`'s position in the list; returns every request's output and the steps that saw a
/// preempted request.
pub struct Driver {
    pub outputs: HashMap<u64, Output>,
    pub running: Option<CachedBatch>,
    pub step: usize,
    pub preempted_steps: usize,
    /// Run each kept batch's next decode step ahead after every step, as the engine thread
    /// does by default ([`Engine::decode_ahead`]).
    pub ahead: bool,
    /// Steps run ahead that computed tokens.
    pub ahead_steps: usize,
}

impl Driver {
    pub fn new() -> Self {
        Self {
            outputs: HashMap::new(),
            running: None,
            step: 0,
            preempted_steps: 0,
            ahead: false,
            ahead_steps: 0,
        }
    }

    /// A driver that runs steps ahead.
    pub fn ahead() -> Self {
        Self {
            ahead: true,
            ..Self::new()
        }
    }

    /// What the engine thread does after answering a step.
    fn after_step(&mut self, e: &mut Engine) {
        if self.ahead {
            e.decode_ahead();
            self.ahead_steps += usize::from(e.held_ahead() > 0);
        }
    }

    pub fn absorb(&mut self, r: medley_shard::engine::StepResponse) {
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

    pub fn join(&mut self, e: &mut Engine, batch_id: u64, requests: Vec<Request>) {
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
        self.after_step(e);
    }

    pub fn decode(&mut self, e: &mut Engine) -> bool {
        let Some(b) = self.running.take() else {
            return false;
        };
        let r = e.decode(vec![b]).unwrap();
        self.absorb(r);
        self.after_step(e);
        true
    }

    /// Keeps only `ids` in the running batch, as the router does when streams go away.
    pub fn filter(&mut self, e: &mut Engine, ids: &[u64]) {
        if let Some(b) = self.running.take() {
            self.running = e.filter(b.id, ids).unwrap();
        }
    }

    pub fn finish(&mut self, e: &mut Engine) {
        while self.decode(e) {}
    }
}

pub fn assert_same(a: &Output, b: &Output, what: &str) {
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
pub fn mixed_requests(first_id: u64) -> Vec<Request> {
    vec![
        request(first_id, prompt(1, 45), 0, 6, true),
        request(first_id + 1, prompt(2, 38), 1, 6, false),
        request(first_id + 2, prompt(3, 51), 2, 6, true),
    ]
}

pub fn run_alone(e: &mut Engine, requests: Vec<Request>) -> HashMap<u64, Output> {
    let mut d = Driver::new();
    d.join(e, 1, requests);
    d.finish(e);
    d.outputs
}
