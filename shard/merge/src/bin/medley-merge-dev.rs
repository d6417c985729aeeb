//! Developer tool of the merge crate: writes fixture adapters and runs merges of PEFT adapter
//! directories (used by the golden scripts and the cross-process determinism test).
//!
//! ```text
//! medley-merge-dev fixture --preset tiny --rank 4 --seed 1 --out /tmp/a
//! medley-merge-dev merge --adapter /tmp/a --adapter /tmp/b --weights 1,0.5 --strategy ties \
//!     --density 0.5 --out /tmp/merged
//! ```

use std::error::Error;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use medley_merge::fixture::{AdapterFixture, LlamaShape};
use medley_merge::peft::{
    TensorDtype, WriteOptions, merged_target_modules, read_adapter_dir, write_merged_dir,
};
use medley_merge::{MergeSpec, Semantics, SignMethod, Strategy, merge};

#[derive(Parser)]
#[command(about = "Fixture adapters and offline merges for medley-merge development")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    Tinyllama,
    Smollm2,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

impl From<Dtype> for TensorDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => TensorDtype::F32,
            Dtype::Bf16 => TensorDtype::Bf16,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic random PEFT adapter.
    Fixture {
        #[arg(long, value_enum, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// lora_alpha (default 2 * rank).
        #[arg(long)]
        alpha: Option<f64>,
        /// Comma-separated target module names.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        )]
        targets: Vec<String>,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        rslora: bool,
        /// Keep only this many decoder layers of the preset (match `medley-fixture --layers`).
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge PEFT adapter directories and print the spec and output hashes as JSON.
    Merge {
        /// Adapter directory (repeat, in component order).
        #[arg(long = "adapter", required = true)]
        adapters: Vec<PathBuf>,
        /// Comma-separated weights, one per adapter.
        #[arg(
            long,
            value_delimiter = ',',
            allow_hyphen_values = true,
            required = true
        )]
        weights: Vec<f32>,
        #[arg(long, default_value = "linear")]
        strategy: String,
        #[arg(long)]
        density: Option<f32>,
        #[arg(long, default_value = "total")]
        sign_method: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        svd_rank: Option<usize>,
        #[arg(long)]
        svd_clamp: Option<f32>,
        #[arg(long, default_value = "peft")]
        semantics: String,
        /// Write the merged adapter here as a PEFT directory.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
    },
}

fn main() -> Result<(), Box<dyn Error>> {
    match Cli::parse().command {
        Command::Fixture {
            preset,
            rank,
            alpha,
            targets,
            dtype,
            seed,
            rslora,
            layers,
            out,
        } => {
            let mut shape = match preset {
                Preset::Tiny => LlamaShape::tiny(),
                Preset::Tinyllama => LlamaShape::tinyllama(),
                Preset::Smollm2 => LlamaShape::smollm2(),
            };
            if let Some(layers) = layers {
                shape.layers = layers;
            }
            let mut fx = AdapterFixture::new(rank, seed);
            fx.alpha = alpha.unwrap_or(2.0 * rank as f64);
            fx.targets = targets;
            fx.dtype = dtype.into();
            fx.use_rslora = rslora;
            fx.write(&out, &shape.module_shapes())?;
            println!("{}", out.display());
        }
        Command::Merge {
            adapters,
            weights,
            strategy,
            density,
            sign_method,
            seed,
            svd_rank,
            svd_clamp,
            semantics,
            out,
            dtype,
        } => {
            let read = adapters
                .iter()
                .map(|d| read_adapter_dir(d))
                .collect::<Result<Vec<_>, _>>()?;
            let spec = MergeSpec {
                strategy: strategy.parse::<Strategy>()?,
                weights,
                density,
                sign_method: sign_method.parse::<SignMethod>()?,
                seed,
                svd_rank,
                svd_clamp,
                semantics: semantics.parse::<Semantics>()?,
            };
            let components: Vec<_> = read.iter().map(|a| &a.adapter).collect();
            let merged = merge(&spec, &components)?;
            if let Some(dir) = &out {
                let configs: Vec<_> = read.iter().map(|a| &a.config).collect();
                let opts = WriteOptions {
                    target_modules: merged_target_modules(
                        &configs,
                        merged.modules.keys().map(String::as_str),
                    ),
                    base_model_name_or_path: read[0].config.base_model_name_or_path.clone(),
                    dtype: dtype.into(),
                };
                write_merged_dir(dir, &merged, &opts)?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "spec_hash": spec.content_hash_hex(),
                    "output_hash": hex::encode(merged.content_hash()),
                    "rank": merged.rank(),
                    "scale": merged.scale,
                    "modules": merged.modules.len(),
                })
            );
        }
    }
    Ok(())
}
