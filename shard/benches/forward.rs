//! Forward-pass throughput of `LlamaModel`: prefill tokens/s and batched decode tokens/s.
//!
//! ```text
//! cargo bench -p medley-shard --bench forward -- --model-dir ../tests/fixtures/tiny-llama
//! cargo bench -p medley-shard --bench forward -- --preset tinyllama --layers 4 \
//!     --cache-dir /tmp/medley-bench --prompt-len 128 --decode-steps 16 --batch-sizes 1,4,16
//! cargo bench -p medley-shard --bench forward -- --preset tinyllama --layers 4 --quantize q4_0
//! ```
//!
//! `--quantize` holds the projections as the shard's flag does (`q8_0`, `q4_0`, `q4_k`, ...
//! quantize at load; `keep` keeps a GGUF model view's blocks) and prints their memory.
//!
//! For each batch size `b`, `b` sequences are prefilled in one step (`b * prompt_len` tokens,
//! logits of the last token only), then decoded for `decode_steps` steps of `b` one-token chunks.
//! Random models come from `medley_shard::fixture::write_model` (cached under `--cache-dir` when
//! given). Set `RAYON_NUM_THREADS` to control the CPU threads. `cargo bench` runs the binary in
//! `shard/`, so relative paths start there.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use medley_shard::fixture::{CachedModel, FixtureDType, ModelFixture, tinyllama_config};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::quant::Quantize;
use medley_shard::model::{ForwardBatch, LlamaModel, LoadOptions, NoLora, SeqChunk};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// The 2-layer test fixture shape.
    Tiny,
    /// TinyLlama-1.1B's shape.
    Tinyllama,
}

#[derive(Parser, Debug)]
#[command(about = "Prefill and decode throughput of the Llama forward pass")]
struct Args {
    /// An existing Hugging Face checkpoint (overrides --preset).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Shape of the random model to generate.
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// Keep only this many decoder layers of the preset.
    #[arg(long)]
    layers: Option<usize>,
    /// Where generated models are kept between runs (a temp dir otherwise).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Compute dtype (f32, bf16, f16); also the storage dtype of generated models.
    /// Defaults to the checkpoint's torch_dtype (f32 for generated models).
    #[arg(long)]
    dtype: Option<String>,
    /// Prompt tokens per sequence.
    /// `--quantize` of the shard: none, keep (a GGUF `--model-dir` view), q8_0, q4_0, q4_1, q4_k...
    #[arg(long, default_value = "none", value_parser = Quantize::parse)]
    quantize: Quantize,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batch_sizes: Vec<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_dtype(s: &str) -> anyhow::Result<(DType, FixtureDType)> {
    match FixtureDType::parse(s) {
        Some(FixtureDType::F32) => Ok((DType::F32, FixtureDType::F32)),
        Some(FixtureDType::BF16) => Ok((DType::BF16, FixtureDType::BF16)),
        Some(FixtureDType::F16) => Ok((DType::F16, FixtureDType::F16)),
        None => anyhow::bail!("unknown dtype `{s}` (f32, bf16, f16)"),
    }
}

/// The model directory to benchmark (a temporary one is removed when the result drops).
fn model_dir(args: &Args) -> anyhow::Result<CachedModel> {
    if let Some(dir) = &args.model_dir {
        return Ok(dir.clone().into());
    }
    let storage = match &args.dtype {
        Some(s) => parse_dtype(s)?.1,
        None => FixtureDType::F32,
    };
    let mut fx = ModelFixture::tiny(storage);
    if let Preset::Tinyllama = args.preset {
        fx.config = tinyllama_config();
    }
    if let Some(l) = args.layers {
        fx.config.num_hidden_layers = l;
    }
    let name = format!(
        "{:?}-{}l-{}",
        args.preset,
        fx.config.num_hidden_layers,
        storage.torch_name()
    )
    .to_lowercase();
    Ok(fx.cached(args.cache_dir.as_deref(), &name)?)
}

struct Row {
    batch: usize,
    prefill_s: f64,
    decode_s: f64,
}

fn run_batch(model: &LlamaModel, args: &Args, b: usize, seed: u64) -> anyhow::Result<Row> {
    let vocab = model.config().vocab_size as u32;
    let per_seq = args.prompt_len + args.decode_steps;
    let mut kv = KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(b * (per_seq + 16) + 64),
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tok = move || rng.random_range(3..vocab);

    // Warm-up: one short sequence through prefill and a decode step.
    kv.allocate(u64::MAX, 64)?;
    let warm: Vec<u32> = (0..8).map(|_| tok()).collect();
    let c = |seq_id, tokens: Vec<u32>, start_pos| SeqChunk {
        seq_id,
        tokens,
        start_pos,
        adapter_slot: 0,
        all_logits: false,
    };
    model.forward(
        &ForwardBatch {
            chunks: vec![c(u64::MAX, warm, 0)],
        },
        &mut kv,
        &NoLora,
    )?;
    model.forward(
        &ForwardBatch {
            chunks: vec![c(u64::MAX, vec![tok()], 8)],
        },
        &mut kv,
        &NoLora,
    )?;
    kv.free(u64::MAX);

    for s in 0..b as u64 {
        kv.allocate(s, per_seq)?;
    }
    let prefill = ForwardBatch {
        chunks: (0..b as u64)
            .map(|s| c(s, (0..args.prompt_len).map(|_| tok()).collect(), 0))
            .collect(),
    };
    let t = Instant::now();
    let logits = model.forward(&prefill, &mut kv, &NoLora)?;
    let prefill_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(logits.dims() == [b, vocab as usize]);

    let t = Instant::now();
    for step in 0..args.decode_steps {
        let batch = ForwardBatch {
            chunks: (0..b as u64)
                .map(|s| c(s, vec![tok()], args.prompt_len + step))
                .collect(),
        };
        model.forward(&batch, &mut kv, &NoLora)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(Row {
        batch: b,
        prefill_s,
        decode_s,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.prompt_len > 0 && args.decode_steps > 0,
        "need a prompt and decode steps"
    );
    let model_dir = model_dir(&args)?;
    let dir = &model_dir.dir;
    let dtype = args
        .dtype
        .as_deref()
        .map(parse_dtype)
        .transpose()?
        .map(|d| d.0);
    let t = Instant::now();
    let model = LlamaModel::load(
        dir,
        &LoadOptions {
            dtype,
            device: Device::Cpu,
            quantize: args.quantize,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading {}", dir.display()))?;
    println!(
        "quantize {} | projection weights {:.1} MiB",
        args.quantize.as_arg(),
        model.projection_bytes() as f64 / (1 << 20) as f64
    );
    let cfg = model.config();
    println!(
        "model {} | layers {} hidden {} heads {}/{} vocab {} | dtype {:?} | {} threads | load {:.2}s",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        model.dtype(),
        rayon::current_num_threads(),
        t.elapsed().as_secs_f64()
    );
    println!(
        "prompt {} tokens, {} decode steps\n",
        args.prompt_len, args.decode_steps
    );
    println!(
        "| batch | prefill tok/s | prefill ms | decode tok/s (aggregate) | ms / decode step |"
    );
    println!(
        "|------:|--------------:|-----------:|-------------------------:|-----------------:|"
    );
    for (i, &b) in args.batch_sizes.iter().enumerate() {
        anyhow::ensure!(b > 0, "batch sizes must be positive");
        let r = run_batch(&model, &args, b, i as u64)?;
        let steps = args.decode_steps as f64;
        println!(
            "| {:>5} | {:>13.1} | {:>10.1} | {:>24.1} | {:>16.2} |",
            r.batch,
            (r.batch * args.prompt_len) as f64 / r.prefill_s,
            r.prefill_s * 1e3,
            r.batch as f64 * steps / r.decode_s,
            r.decode_s * 1e3 / steps
        );
    }
    Ok(())
}
