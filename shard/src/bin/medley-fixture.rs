//! `medley-fixture`: writes the deterministic random checkpoints (and later adapters) that Medley's
//! tests and benchmarks use.
//!
//! ```text
//! medley-fixture model --preset tiny --dtype f32 --out tests/fixtures/tiny-llama
//! medley-fixture model --preset tinyllama --layers 4 --out /tmp/tinyllama-4l
//! medley-fixture gguf --model /tmp/tinyllama-4l --type q4_1 --out /tmp/tinyllama-4l.Q4_1.gguf
//! ```

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use medley_shard::fixture::{
    FixtureDType, ModelFixture, llama3_rope_scaling, tinyllama_config, write_gguf, write_model,
};
use medley_shard::model::quant::Quantize;

#[derive(Parser)]
#[command(version, about = "Write Medley's deterministic test fixtures")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// 2 layers, hidden 64, GQA 4/2 heads, vocab 512 (the committed fixture).
    Tiny,
    /// TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32/4 heads, vocab 32000.
    Tinyllama,
}

#[derive(Subcommand)]
enum Command {
    /// A random Llama checkpoint in Hugging Face layout.
    Model {
        #[arg(long, value_enum, default_value = "tiny")]
        preset: Preset,
        /// f32 | bf16 | f16
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights (defaults to the preset's).
        #[arg(long)]
        seed: Option<u64>,
        /// Keep only this many decoder layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Split weights into shards of at most this many bytes (writes an index file).
        #[arg(long)]
        max_shard_bytes: Option<usize>,
        /// Add a Llama-3 `rope_scaling` block.
        #[arg(long)]
        llama3_rope: bool,
        /// Tie `lm_head` to the embedding (no `lm_head.weight` written).
        #[arg(long)]
        tie_embeddings: bool,
    },
    /// A checkpoint (a `model` output) as one GGUF file, the way llama.cpp's converter writes it.
    Gguf {
        /// The Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// GGML type of the 2-D weights: f32, f16, q8_0, q4_0, q4_1, q4_k, ...
        #[arg(long = "type", default_value = "q8_0")]
        ggml_type: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model {
            preset,
            dtype,
            out,
            seed,
            layers,
            max_shard_bytes,
            llama3_rope,
            tie_embeddings,
        } => {
            let dtype = FixtureDType::parse(&dtype)
                .ok_or_else(|| anyhow::anyhow!("unknown dtype `{dtype}` (f32, bf16, f16)"))?;
            let mut fx = ModelFixture::tiny(dtype);
            if let Preset::Tinyllama = preset {
                fx.config = tinyllama_config();
            }
            if let Some(seed) = seed {
                fx.seed = seed;
            }
            if let Some(layers) = layers {
                fx.config.num_hidden_layers = layers;
            }
            if llama3_rope {
                fx.config.rope_scaling = Some(llama3_rope_scaling());
            }
            fx.config.tie_word_embeddings = tie_embeddings;
            fx.max_shard_bytes = max_shard_bytes;
            write_model(&out, &fx)?;
            println!("wrote {}", out.display());
        }
        Command::Gguf {
            model,
            ggml_type,
            out,
        } => {
            let dtype = match ggml_type.as_str() {
                "f32" => candle_core::quantized::GgmlDType::F32,
                "f16" => candle_core::quantized::GgmlDType::F16,
                other => match Quantize::parse(other).map_err(anyhow::Error::msg)? {
                    Quantize::To(t) => t,
                    _ => anyhow::bail!("--type {other}: a GGML type (f32, f16, q8_0, q4_1, ...)"),
                },
            };
            write_gguf(&model, &out, dtype)?;
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
