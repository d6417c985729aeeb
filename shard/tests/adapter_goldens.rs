//! Serving LoRA adapters against PEFT goldens (committed outputs of
//! `scripts/goldens/adapter_goldens.py`; no Python needed here): the tiny model with single
//! adapters and with merges computed by `medley_merge` in PEFT semantics, loaded through the
//! shard's adapter loader and slots, against PEFT's `PeftModel` and `add_weighted_adapter`. Also
//! checks that one batch mixing the base model, single adapters and a merge gives every row what
//! it gets alone.

#![allow(clippy::unwrap_used)]

mod engine_harness;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use engine_harness::{ADAPTERS, adapter_loader, argmax, fixtures, max_abs_diff, tiny};
use medley_merge::{MergeSpec, SignMethod, Strategy};
use medley_shard::adapters::{AdapterStore, LoraBackend};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{ForwardBatch, LlamaModel, LoadOptions, SeqChunk};

/// A golden case: its name (key prefix in the goldens) and how to build it.
struct Case {
    name: &'static str,
    merge: Option<MergeSpec>,
}

/// The cases of `adapter_goldens.json`, in slot order 1..=6.
fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = ADAPTERS
        .iter()
        .map(|name| Case { name, merge: None })
        .collect();
    cases.push(Case {
        name: "ties",
        merge: Some(
            MergeSpec::new(Strategy::Ties, vec![1.0, 0.6, -0.3])
                .with_density(0.5)
                .with_sign_method(SignMethod::Total),
        ),
    });
    cases.push(Case {
        name: "linear",
        merge: Some(MergeSpec::new(Strategy::Linear, vec![0.7, 0.5, 0.4])),
    });
    cases.push(Case {
        name: "cat",
        merge: Some(MergeSpec::new(Strategy::Cat, vec![1.0, -0.5, 0.8])),
    });
    cases
}

struct Goldens(HashMap<String, Tensor>);

impl Goldens {
    fn load() -> Self {
        let path = fixtures().join("goldens/adapter_goldens.safetensors");
        Self(candle_core::safetensors::load(path, &Device::Cpu).unwrap())
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.0[key]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }

    fn logits(&self, key: &str) -> Vec<Vec<f32>> {
        self.0[key].to_vec2::<f32>().unwrap()
    }

    fn prompts(&self) -> Vec<Vec<u32>> {
        (0..)
            .map(|i| format!("p{i}.ids"))
            .take_while(|k| self.0.contains_key(k))
            .map(|k| self.ids(&k))
            .collect()
    }
}

/// The base model and a store with every case installed (case `i` in slot `i + 1`).
fn setup(backend: LoraBackend) -> (LlamaModel, AdapterStore) {
    let model = LlamaModel::load(&tiny(), &LoadOptions::default()).unwrap();
    let loader = adapter_loader(&model);
    let mut store = AdapterStore::new(8, 1 << 30, backend);
    for (i, case) in cases().into_iter().enumerate() {
        let ids: &[&str] = match case.merge {
            None => &[case.name],
            Some(_) => &ADAPTERS,
        };
        let sources: Vec<_> = ids
            .iter()
            .map(|id| loader.sources().resolve_local(id).unwrap())
            .collect();
        let prepared = loader.build(&sources, case.merge.as_ref()).unwrap();
        store.install(i as u32 + 1, prepared.adapter).unwrap();
    }
    (model, store)
}

fn kv_for(model: &LlamaModel) -> KvCache {
    KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(4096),
    )
    .unwrap()
}

fn chunk(seq_id: u64, tokens: Vec<u32>, start_pos: usize, slot: u32, all: bool) -> SeqChunk {
    SeqChunk {
        seq_id,
        tokens,
        start_pos,
        adapter_slot: slot,
        all_logits: all,
    }
}

fn forward(
    model: &LlamaModel,
    kv: &mut KvCache,
    store: &AdapterStore,
    chunks: Vec<SeqChunk>,
) -> Vec<Vec<f32>> {
    model
        .forward(&ForwardBatch { chunks }, kv, store)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Prompt logits (one prefill with every row's logits) and 20 greedy tokens (decode through the
/// KV cache) of every case against PEFT.
///
/// Tolerance 1e-4 on logits of magnitude ~10: PEFT and the shard evaluate the same f32 formulas
/// in different summation orders (and the merges were computed by different code), which moves
/// logits by a few 1e-6; 1e-4 leaves margin while any wrong scale, sign or module would show as
/// an error of 1e-2 or more. The goldens' greedy paths keep a top-1/top-2 gap of at least 1e-3,
/// so identical tokens are a well-defined requirement.
fn check_goldens(backend: LoraBackend) {
    let g = Goldens::load();
    let (model, store) = setup(backend);
    let prompts = g.prompts();
    assert_eq!(prompts.len(), 2);
    let mut kv = kv_for(&model);
    let mut seq = 0u64;
    let mut worst = 0f32;
    for (c, case) in cases().iter().enumerate() {
        let slot = c as u32 + 1;
        for (p, ids) in prompts.iter().enumerate() {
            seq += 1;
            kv.allocate(seq, ids.len() + 20).unwrap();
            let rows = forward(
                &model,
                &mut kv,
                &store,
                vec![chunk(seq, ids.clone(), 0, slot, true)],
            );
            let want = g.logits(&format!("{}.p{p}.logits", case.name));
            assert_eq!(rows.len(), want.len());
            for (r, w) in rows.iter().zip(&want) {
                let d = max_abs_diff(r, w);
                worst = worst.max(d);
                assert!(
                    d <= 1e-4,
                    "{backend:?} {} prompt {p}: logits differ by {d}",
                    case.name
                );
            }
            let want_greedy = g.ids(&format!("{}.p{p}.greedy", case.name));
            let base_greedy = g.ids(&format!("base.p{p}.greedy"));
            let mut tokens = vec![argmax(rows.last().unwrap())];
            let mut pos = ids.len();
            while tokens.len() < want_greedy.len() {
                let last = *tokens.last().unwrap();
                let row = forward(
                    &model,
                    &mut kv,
                    &store,
                    vec![chunk(seq, vec![last], pos, slot, false)],
                );
                tokens.push(argmax(&row[0]));
                pos += 1;
            }
            kv.free(seq);
            assert_eq!(tokens, want_greedy, "{backend:?} {} prompt {p}", case.name);
            if p == 1 {
                assert_ne!(
                    tokens, base_greedy,
                    "{}: the adapter changes nothing",
                    case.name
                );
            }
        }
    }
    eprintln!("{backend:?}: largest logit difference vs PEFT {worst:.2e}");
}

#[test]
fn single_adapters_and_merges_match_peft_with_kernels() {
    check_goldens(LoraBackend::Kernels);
}

#[test]
fn single_adapters_and_merges_match_peft_with_candle_ops() {
    check_goldens(LoraBackend::Candle);
}

/// One batch with rows of the base model, two single adapters and a merge (prefill chunks, then
/// a decode step) gives every sequence the logits it gets alone. Tolerance 1e-5: the same f32
/// computation, only the matmul blocking differs with the number of rows.
#[test]
fn mixed_batch_rows_match_running_alone() {
    let g = Goldens::load();
    let prompts = g.prompts();
    for backend in [LoraBackend::Kernels, LoraBackend::Candle] {
        let (model, store) = setup(backend);
        // (slot, prompt): base, strong_a, strong_b, ties.
        let plan = [(0u32, 0usize), (1, 1), (2, 0), (4, 1)];
        let mut alone = Vec::new();
        for (i, &(slot, p)) in plan.iter().enumerate() {
            let mut kv = kv_for(&model);
            let ids = prompts[p].clone();
            kv.allocate(i as u64, ids.len() + 1).unwrap();
            let pre = forward(
                &model,
                &mut kv,
                &store,
                vec![chunk(i as u64, ids.clone(), 0, slot, true)],
            );
            let next = argmax(pre.last().unwrap());
            let dec = forward(
                &model,
                &mut kv,
                &store,
                vec![chunk(i as u64, vec![next], ids.len(), slot, false)],
            );
            alone.push((pre, next, dec.into_iter().next().unwrap()));
        }
        let mut kv = kv_for(&model);
        let mut chunks = Vec::new();
        for (i, &(slot, p)) in plan.iter().enumerate() {
            kv.allocate(i as u64, prompts[p].len() + 1).unwrap();
            chunks.push(chunk(i as u64, prompts[p].clone(), 0, slot, true));
        }
        let rows = forward(&model, &mut kv, &store, chunks);
        let mut offset = 0;
        for (i, &(_, p)) in plan.iter().enumerate() {
            for (r, want) in alone[i].0.iter().enumerate() {
                let d = max_abs_diff(&rows[offset + r], want);
                assert!(d <= 1e-5, "{backend:?} seq {i} row {r}: {d}");
            }
            offset += prompts[p].len();
        }
        // A decode step over all four, in reverse order (slots interleaved differently).
        let chunks: Vec<SeqChunk> = plan
            .iter()
            .enumerate()
            .rev()
            .map(|(i, &(slot, p))| chunk(i as u64, vec![alone[i].1], prompts[p].len(), slot, false))
            .collect();
        let rows = forward(&model, &mut kv, &store, chunks);
        for (k, i) in (0..plan.len()).rev().enumerate() {
            let d = max_abs_diff(&rows[k], &alone[i].2);
            assert!(d <= 1e-5, "{backend:?} decode seq {i}: {d}");
        }
        // And the adapters really act: each adapter row differs from the base model's.
        let base = &alone[2].0;
        let mut kv = kv_for(&model);
        kv.allocate(99, prompts[0].len()).unwrap();
        let plain = forward(
            &model,
            &mut kv,
            &store,
            vec![chunk(99, prompts[0].clone(), 0, 0, true)],
        );
        assert!(max_abs_diff(&plain[0], &base[0]) > 1e-2);
    }
}
