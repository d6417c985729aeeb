//! A decode step padded to a CUDA graph's size ([`BatchPlan::padded`]) with the uniform LoRA
//! mapping gives its own rows the logits of the step as it comes, on the CPU (the graphs run on
//! a GPU only; the plan, the LoRA mapping and the logit rows are the same code there).
//!
//! Tolerance: none, in f32 and bf16. Every op computes a row from that row alone, and the CPU
//! matmuls sum each output in the same order whatever the number of rows. (On a GPU cuBLAS may
//! pick another algorithm for another row count; the GPU check compares a graph server's tokens
//! with the eager server's.)

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use medley_merge::fixture::AdapterFixture;

use crate::adapters::base::BaseModules;
use crate::adapters::store::{AdapterStore, LoraBackend};
use crate::adapters::weights::SlotWeights;
use crate::fixture::{FixtureDType, ModelFixture, adapter_shape, write_model};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::model::batch::BatchPlan;
use crate::model::{ForwardBatch, LlamaModel, LoadOptions, NoLora, SeqChunk};

fn logits(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

#[test]
fn padding_rows_leave_the_step_s_logits_alone() {
    // f32 attends through the CPU kernel, bf16 per sequence (candle ops).
    for dtype in [DType::F32, DType::BF16] {
        padded_step(dtype);
    }
}

fn padded_step(dtype: DType) {
    let tmp = tempfile::tempdir().unwrap();
    let fx = ModelFixture::tiny(FixtureDType::F32);
    write_model(tmp.path(), &fx).unwrap();
    let opts = LoadOptions {
        dtype: Some(dtype),
        ..LoadOptions::default()
    };
    let model = LlamaModel::load(tmp.path(), &opts).unwrap();
    let cfg = model.config().clone();
    let base = BaseModules::from_config(&cfg);
    let mut store = AdapterStore::new(4, 1 << 30, LoraBackend::Kernels);
    // Slot 1 lacks k, o, gate and up: with the uniform mapping it is in those calls without
    // factors.
    let mut partial = AdapterFixture::new(4, 31);
    partial.targets = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    // Slot 3 (rank 16) is loaded but used by no row: the uniform mapping's calls take it too.
    let slots_loaded = [
        (1, partial),
        (2, AdapterFixture::new(8, 32)),
        (3, AdapterFixture::new(16, 33)),
    ];
    for (slot, fx) in slots_loaded {
        let adapter = fx.adapter(&adapter_shape(&cfg).module_shapes()).unwrap();
        let w = SlotWeights::from_adapter(&adapter, &base).unwrap();
        store
            .install(slot, w.to_device(&base, &Device::Cpu).unwrap())
            .unwrap();
    }
    let mut kv = KvCache::new(
        &cfg,
        dtype,
        &Device::Cpu,
        KvCacheConfig {
            capacity_tokens: 256,
            block_tokens: 4,
            prefix_caching: false,
        },
    )
    .unwrap();
    // Three sequences (adapter 2, the base model, adapter 1) after prompts of 5, 3 and 6.
    let slots = [2u32, 0, 1];
    let mut chunks = Vec::new();
    for (i, (&slot, len)) in slots.iter().zip([5usize, 3, 6]).enumerate() {
        let seq_id = 10 + i as u64;
        kv.allocate(seq_id, 64).unwrap();
        chunks.push(SeqChunk {
            seq_id,
            tokens: (0..len as u32).map(|t| 7 * t + i as u32 + 1).collect(),
            start_pos: 0,
            adapter_slot: slot,
            all_logits: false,
        });
    }
    model
        .forward(
            &ForwardBatch {
                chunks: chunks.clone(),
            },
            &mut kv,
            &store,
        )
        .unwrap();
    let decode = ForwardBatch {
        chunks: chunks
            .iter()
            .map(|c| SeqChunk {
                tokens: vec![c.tokens[0] + 100],
                start_pos: c.tokens.len(),
                ..c.clone()
            })
            .collect(),
    };
    let plan = model.prepare(&decode, &mut kv).unwrap();
    let pad = kv.pad_block().unwrap();
    let run = |plan: &BatchPlan| {
        let inputs = model.upload_inputs(plan, &kv).unwrap();
        logits(&model.compute(plan, &kv, &inputs, &store).unwrap())
    };
    let want = run(&plan);
    for padded in [plan.clone().with_uniform_rows(), plan.padded(8, pad)] {
        assert!(padded.row_slots.uniform());
        let got = run(&padded);
        assert_eq!(got.len(), padded.num_rows());
        assert_eq!(got[..want.len()], want[..], "{dtype:?}, {} rows", got.len());
        assert!(got.iter().flatten().all(|v| v.is_finite()));
    }
    // The adapters did change the rows they serve.
    let base_only = {
        let inputs = model.upload_inputs(&plan, &kv).unwrap();
        logits(&model.compute(&plan, &kv, &inputs, &NoLora).unwrap())
    };
    assert_ne!(base_only[0], want[0]);
    assert_eq!(base_only[1], want[1]);
    assert_ne!(base_only[2], want[2]);
}
