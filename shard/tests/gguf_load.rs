//! GGUF checkpoints: the committed tiny model written as GGUF the way llama.cpp's converter
//! writes it (llama.cpp names, rotary-permuted `q`/`k` rows, metadata config and tokenizer),
//! loaded back through a model view directory, must be the same model: with F32 tensors the
//! logits are bit-identical to the safetensors checkpoint's; with Q8_0 they stay close.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use medley_shard::fixture::write_gguf_view;
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::quant::Quantize;
use medley_shard::model::{ForwardBatch, LlamaModel, LoadOptions, NoLora, SeqChunk};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

/// Writes the tiny model as a GGUF file in `dtype` and its view directory under `tmp`.
fn gguf_view(tmp: &Path, dtype: GgmlDType) -> PathBuf {
    write_gguf_view(&tiny(), tmp, dtype).unwrap()
}

/// Logits at every position of `tokens` (one prefill).
fn logits(model: &LlamaModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(256),
    )
    .unwrap();
    kv.allocate(1, tokens.len()).unwrap();
    let chunk = SeqChunk {
        seq_id: 1,
        tokens: tokens.to_vec(),
        start_pos: 0,
        adapter_slot: 0,
        all_logits: true,
    };
    model
        .forward(
            &ForwardBatch {
                chunks: vec![chunk],
            },
            &mut kv,
            &NoLora,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

const PROMPT: [u32; 12] = [1, 17, 99, 240, 3, 511, 64, 65, 66, 300, 12, 7];

#[test]
fn f32_gguf_is_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let view = gguf_view(tmp.path(), GgmlDType::F32);
    medley_hub::model_dir::check_model_dir(&view).unwrap();
    let a = LlamaModel::load(&tiny(), &LoadOptions::default()).unwrap();
    let b = LlamaModel::load(&view, &LoadOptions::default()).unwrap();
    assert_eq!(a.config().num_hidden_layers, b.config().num_hidden_layers);
    assert_eq!(logits(&a, &PROMPT), logits(&b, &PROMPT));

    // The converted tokenizer encodes like the original.
    let ta = tokenizers::Tokenizer::from_file(tiny().join("tokenizer.json")).unwrap();
    let tb = tokenizers::Tokenizer::from_file(view.join("tokenizer.json")).unwrap();
    let text = "The quick brown fox jumps over the lazy dog 42 times.";
    assert_eq!(
        ta.encode(text, true).unwrap().get_ids(),
        tb.encode(text, true).unwrap().get_ids()
    );
}

#[test]
fn the_file_holds_llama_cpp_rotary_rows() {
    // Guards the test above against a writer and a loader that both forget the permutation:
    // the stored `attn_q` rows are a reordering of `q_proj`'s, not `q_proj` itself.
    let tmp = tempfile::tempdir().unwrap();
    gguf_view(tmp.path(), GgmlDType::F32);
    let mut f = std::fs::File::open(tmp.path().join("model.F32.gguf")).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let stored = content
        .tensor(&mut f, "blk.0.attn_q.weight", &candle_core::Device::Cpu)
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let st =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let hf = st["model.layers.0.self_attn.q_proj.weight"]
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(stored, hf);
    let key = |rows: &[Vec<f32>]| {
        let mut v: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|x| x.to_bits()).collect())
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&stored), key(&hf));
}

#[test]
fn dequantized_q8_0_gguf_is_close() {
    let tmp = tempfile::tempdir().unwrap();
    let view = gguf_view(tmp.path(), GgmlDType::Q8_0);
    let a = LlamaModel::load(&tiny(), &LoadOptions::default()).unwrap();
    let b = load_with(&view, Quantize::None);
    let (la, lb) = (logits(&a, &PROMPT), logits(&b, &PROMPT));
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (x, y) in la.iter().flatten().zip(lb.iter().flatten()) {
        worst = worst.max((x - y).abs());
        scale = scale.max(x.abs());
    }
    // Q8_0 keeps ~2-3 significant digits per weight; the logits move by well under 5% of
    // their range on this 2-layer model, and they do move (the file is really quantized).
    assert!(
        worst > 0.0 && worst < 0.05 * scale,
        "worst {worst}, scale {scale}"
    );
}

#[test]
fn broken_gguf_files_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let view = tmp.path().join("view");
    std::fs::create_dir(&view).unwrap();
    std::fs::copy(tiny().join("config.json"), view.join("config.json")).unwrap();
    std::fs::write(tmp.path().join("bad.gguf"), b"GGUF but not really").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("bad.gguf"), view.join("model.gguf")).unwrap();
    let Err(err) = LlamaModel::load(&view, &LoadOptions::default()) else {
        panic!("a broken GGUF file loaded");
    };
    assert!(err.to_string().contains("GGUF"), "{err}");
}

fn load_with(dir: &Path, quantize: Quantize) -> LlamaModel {
    let opts = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    LlamaModel::load(dir, &opts).unwrap()
}

fn worst_and_scale(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        worst = worst.max((x - y).abs());
        scale = scale.max(x.abs());
    }
    (worst, scale)
}

#[test]
fn quantized_weights_are_kept_from_gguf_and_made_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let view = gguf_view(tmp.path(), GgmlDType::Q8_0);
    let dense = load_with(&view, Quantize::None);
    // `auto` keeps a GGUF file's blocks on the CPU; the projections shrink to about 34/128 of
    // f32 (Q8_0: 34 bytes per 32 values), except down_proj (176 columns, F16 in the file).
    let kept = load_with(&view, Quantize::Auto);
    assert_eq!(
        kept.projection_bytes(),
        load_with(&view, Quantize::Keep).projection_bytes()
    );
    assert!(
        kept.projection_bytes() * 2 < dense.projection_bytes(),
        "{} vs {}",
        kept.projection_bytes(),
        dense.projection_bytes()
    );
    let (ld, lk) = (logits(&dense, &PROMPT), logits(&kept, &PROMPT));
    let (worst, scale) = worst_and_scale(&ld, &lk);
    // Kept Q8_0 blocks multiply f32 activations (`medley_kernels::qmatmul`): the dequantized
    // model's logits up to f32 summation order.
    assert!(worst <= 1e-5 * scale, "worst {worst}, scale {scale}");

    // Quantizing a safetensors model at load: Q8_0 close to f32, Q4_K smaller still (the tiny
    // model's rows of 64 values do not fill a 256-value K-block: those stay dense).
    let f32_model = load_with(&tiny(), Quantize::None);
    let q8 = load_with(&tiny(), Quantize::To(GgmlDType::Q8_0));
    let (worst, scale) = worst_and_scale(&logits(&f32_model, &PROMPT), &logits(&q8, &PROMPT));
    assert!(
        worst > 0.0 && worst < 0.05 * scale,
        "worst {worst}, scale {scale}"
    );
    assert!(q8.projection_bytes() * 2 < f32_model.projection_bytes());
    let q4k = load_with(&tiny(), Quantize::To(GgmlDType::Q4K));
    assert_eq!(q4k.projection_bytes(), f32_model.projection_bytes());
}
