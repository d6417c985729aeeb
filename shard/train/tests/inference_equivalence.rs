//! The training forward equals Medley's inference forward: a model written by
//! `medley_train::write_base` and loaded by `medley_shard::model::LlamaModel` gives the same
//! logits, and so does an adapter written by `medley_train::write_adapter` and served through the
//! shard's adapter loader and slots (PEFT names, `alpha / r` scaling and factor layouts).
//!
//! Tolerance: 1e-4 absolute on f32 logits of magnitude up to ~10. Both sides evaluate the same
//! formulas in f32 but in different orders (candle's batched gemm here, Medley's streaming
//! matmul kernel and tiled online-softmax attention there, candle's fused RMSNorm and RoPE ops
//! against their expansions here), which moves logits by about 1e-6; any wrong layout, scale or
//! rotation shows as an error of 1e-2 or more.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use medley_hub::HubSettings;
use medley_merge::peft::read_adapter_dir;
use medley_shard::adapters::{
    AdapterLoader, AdapterSettings, AdapterStore, BaseModules, LoraBackend,
};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{
    ForwardBatch, LlamaDims, LlamaModel, LoadOptions, ModelConfig, NoLora, SeqChunk,
};
use medley_train::{
    AdapterMeta, Batch, ForwardOptions, InitConfig, Llama, LoraConfig, LoraSet, SaveDtype,
    Sequence, Target, write_adapter, write_base,
};

const TOLERANCE: f32 = 1e-4;

fn sequences() -> Vec<Vec<u32>> {
    vec![
        vec![1, 5, 9, 13, 2, 40, 41, 7],
        vec![3, 3, 8],
        vec![60, 12, 33, 4, 18, 22, 27, 51, 50, 6, 0, 11, 19],
    ]
}

/// Logits of the training forward for each sequence (one right-padded batch), real rows only.
fn training_logits(model: &Llama, lora: Option<&LoraSet>) -> Vec<Vec<Vec<f32>>> {
    // Batch::new drops each sequence's last token from the inputs: append a dummy one.
    let seqs: Vec<Sequence> = sequences()
        .into_iter()
        .map(|mut s| {
            s.push(0);
            Sequence::all(s)
        })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::new(&refs, 64, 0, DType::F32, &Device::Cpu).unwrap();
    let opts = ForwardOptions {
        lora,
        ..ForwardOptions::default()
    };
    let logits = model
        .forward(&batch.ids, opts)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    logits
        .into_iter()
        .zip(sequences())
        .map(|(rows, s)| rows[..s.len()].to_vec())
        .collect()
}

/// Logits of the shard for each sequence, every position, with the adapter in `slot` (0: none).
fn shard_logits(model: &LlamaModel, store: Option<&AdapterStore>, slot: u32) -> Vec<Vec<Vec<f32>>> {
    let mut kv = KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(1024),
    )
    .unwrap();
    sequences()
        .into_iter()
        .enumerate()
        .map(|(i, tokens)| {
            let seq_id = i as u64;
            kv.allocate(seq_id, tokens.len()).unwrap();
            let chunk = SeqChunk {
                seq_id,
                tokens,
                start_pos: 0,
                adapter_slot: slot,
                all_logits: true,
            };
            let batch = ForwardBatch {
                chunks: vec![chunk],
            };
            let out = match store {
                Some(s) => model.forward(&batch, &mut kv, s),
                None => model.forward(&batch, &mut kv, &NoLora),
            };
            kv.free(seq_id);
            out.unwrap().to_vec2::<f32>().unwrap()
        })
        .collect()
}

fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (r, s) in x.iter().zip(y) {
            assert_eq!(r.len(), s.len());
            for (u, v) in r.iter().zip(s) {
                worst = worst.max((u - v).abs());
            }
        }
    }
    worst
}

fn largest(a: &[Vec<Vec<f32>>]) -> f32 {
    a.iter()
        .flatten()
        .flatten()
        .fold(0f32, |m, v| m.max(v.abs()))
}

fn model(tied: bool) -> Llama {
    let mut shape = ModelConfig::llama(LlamaDims {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 80,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
    });
    shape.tie_word_embeddings = tied;
    shape.rope_theta = 500.0;
    shape.bos_token_id = Some(1);
    shape.eos_token_ids = vec![2];
    // A wide init so the logits are far from uniform (std 0.02 would make every check trivial).
    Llama::init(
        &shape,
        InitConfig {
            seed: 11,
            std: 0.25,
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn check_base(tied: bool, dir: &Path) {
    let m = model(tied);
    write_base(dir, &m, SaveDtype::F32).unwrap();
    let served = LlamaModel::load(dir, &LoadOptions::default()).unwrap();
    let want = shard_logits(&served, None, 0);
    let got = training_logits(&m, None);
    let d = max_diff(&got, &want);
    assert!(largest(&want) > 1.0, "logits too flat to prove anything");
    assert!(d <= TOLERANCE, "tied={tied}: logits differ by {d}");
    eprintln!(
        "base (tied={tied}): max |Δlogit| {d:.2e}, max |logit| {:.2}",
        largest(&want)
    );
}

#[test]
fn base_model_matches_the_shard_forward() {
    let dir = tempfile::tempdir().unwrap();
    check_base(false, &dir.path().join("untied"));
    check_base(true, &dir.path().join("tied"));
}

#[test]
fn adapter_matches_the_shard_adapter_path() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    let m = model(false);
    write_base(&base_dir, &m, SaveDtype::F32).unwrap();
    // Rank 4, alpha 12: scale 3, so a missing or doubled scale shows.
    let cfg = LoraConfig {
        rank: 4,
        alpha: 12.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        seed: 4,
    };
    let lora = LoraSet::init(m.shape(), &cfg, DType::F32, &Device::Cpu).unwrap();
    // Random B (a fresh adapter's B is zero and would prove nothing).
    for (name, var) in lora.params().iter() {
        if name.contains("lora_B") {
            let v = medley_train::params::draw(
                8,
                name,
                var.elem_count(),
                medley_train::params::Init::Normal(0.1),
            )
            .unwrap();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let roots = dir.path().join("adapters");
    let meta = AdapterMeta {
        base_model_name_or_path: Some("medley-demo-base".into()),
    };
    write_adapter(&roots.join("demo"), &lora, &meta).unwrap();

    // The PEFT files read back through medley_merge::peft with the same factors and scale.
    let peft = read_adapter_dir(&roots.join("demo")).unwrap();
    assert_eq!(peft.config.r, 4);
    assert_eq!(peft.config.lora_alpha, 12.0);
    assert_eq!(peft.adapter.modules().len(), 2 * 7);
    for (path, module) in peft.adapter.modules() {
        assert_eq!(module.scale(), 3.0);
        let a = lora.params().get(&format!("{path}.lora_A.weight")).unwrap();
        assert_eq!(
            module.a().data(),
            &a.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..]
        );
    }

    let served = LlamaModel::load(&base_dir, &LoadOptions::default()).unwrap();
    let mut settings = AdapterSettings::new(HubSettings::from_vars(None, |_| None));
    settings.roots = vec![roots];
    settings.merge_threads = 1;
    let loader = AdapterLoader::new(
        &settings,
        BaseModules::from_config(served.config()),
        &Device::Cpu,
    )
    .unwrap();
    let source = loader.sources().resolve_local("demo").unwrap();
    let prepared = loader.build(&[source], None).unwrap();
    for backend in [LoraBackend::Kernels, LoraBackend::Candle] {
        let mut store = AdapterStore::new(4, 1 << 30, backend);
        store.install(1, prepared.adapter.clone()).unwrap();
        let want = shard_logits(&served, Some(&store), 1);
        let got = training_logits(&m, Some(&lora));
        let base = training_logits(&m, None);
        assert!(
            max_diff(&got, &base) > 0.1,
            "the adapter changes too little to prove anything"
        );
        let d = max_diff(&got, &want);
        assert!(
            d <= TOLERANCE,
            "{backend:?}: logits with the adapter differ by {d}"
        );
        eprintln!("adapter ({backend:?}): max |Δlogit| {d:.2e}");
    }
}
