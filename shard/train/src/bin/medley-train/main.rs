//! `medley-train`: trains the demo's base model and adapters.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use medley_demo::Task;
use medley_shard::model::{LlamaDims, ModelConfig};
use medley_train::demo::{DemoConfig, DemoSummary, run_adapters, run_demo};
use medley_train::measure::measure;
use medley_train::{SaveDtype, TrainError};

mod overrides;

use overrides::{LoraOverrides, PretrainOverrides};

#[derive(Parser)]
#[command(
    name = "medley-train",
    about = "Train the demo's base model and LoRA adapters (CPU, candle)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Size presets of `demo`.
#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// The shipped demo (minutes on 2 cores).
    Full,
    /// A tiny, fast run of the same pipeline.
    Smoke,
    /// Adapters for SmolLM2-135M-Instruct (`lora --base FILE.gguf`; see `medley_train::smollm2`).
    Smollm2,
}

/// Storage dtypes of the base weights.
#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    /// 32-bit float (exactly the trained values).
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

#[derive(Subcommand)]
enum Command {
    /// Build the demo: tokenizer + corpus (medley-demo), pretrain the base, train the `sql`,
    /// `ad` and `instruct` adapters, write `OUT/base/` and `OUT/adapters/<task>/`.
    Demo {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the data, the initialisation and the data order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size preset.
        #[arg(long, value_enum, default_value_t = Preset::Full)]
        preset: Preset,
        #[command(flatten)]
        pretrain: PretrainOverrides,
        /// Storage dtype of the base weights (Medley loads all three).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        save_dtype: Dtype,
        #[command(flatten)]
        lora: LoraOverrides,
    },
    /// Train adapters on an existing demo base (`OUT/base` of `demo`, trained with the same
    /// seed), e.g. to try other adapter settings without pretraining again.
    Lora {
        /// The base directory (model and tokenizer.json).
        #[arg(long)]
        base: PathBuf,
        /// Output directory (`OUT/adapters/<task>/`, `OUT/summary.json`).
        #[arg(long)]
        out: PathBuf,
        /// Tasks, comma-separated.
        #[arg(long, default_value = "sql,ad,instruct")]
        tasks: String,
        /// The base's seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Size preset.
        #[arg(long, value_enum, default_value_t = Preset::Full)]
        preset: Preset,
        /// Start from the adapters in `DIR/<task>/` (e.g. `OUT/adapters` of an earlier run)
        /// instead of fresh ones; with `--task-steps sql=0,...` only the merge-aware
        /// co-training runs.
        #[arg(long, value_name = "DIR")]
        init_adapters: Option<PathBuf>,
        #[command(flatten)]
        lora: LoraOverrides,
    },
    /// Measure training tokens/s for model shapes x batch sizes x sequence lengths.
    Measure {
        /// Vocabulary size.
        #[arg(long, default_value_t = 2048)]
        vocab: usize,
        /// Shapes as `hidden:layers:intermediate:heads:kv_heads`, comma-separated.
        #[arg(long, default_value = "128:4:352:4:2,192:4:512:6:2,256:4:704:8:4")]
        shapes: String,
        /// Batch sizes, comma-separated.
        #[arg(long, default_value = "8,16,32")]
        batches: String,
        /// Sequence lengths, comma-separated.
        #[arg(long, default_value = "64")]
        lens: String,
        /// Timed steps per configuration.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

fn preset(preset: Preset, seed: u64) -> DemoConfig {
    match preset {
        Preset::Full => DemoConfig::full(seed),
        Preset::Smoke => DemoConfig::smoke(seed),
        Preset::Smollm2 => DemoConfig::smollm2(seed),
    }
}

fn list(s: &str) -> Result<Vec<usize>, TrainError> {
    s.split([',', ':'])
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .map_err(|e| TrainError::Config(format!("`{x}`: {e}")))
        })
        .collect()
}

fn run(cli: Cli) -> Result<(), TrainError> {
    match cli.command {
        Command::Demo {
            out,
            seed,
            preset: p,
            pretrain,
            save_dtype,
            lora,
        } => {
            if matches!(p, Preset::Smollm2) {
                return Err(TrainError::Config(
                    "the smollm2 preset trains adapters on the released model: run \
                     `medley-train lora --preset smollm2 --base FILE.gguf --out DIR`"
                        .into(),
                ));
            }
            let mut cfg = preset(p, seed);
            pretrain.apply(&mut cfg);
            cfg.save_dtype = match save_dtype {
                Dtype::F32 => SaveDtype::F32,
                Dtype::Bf16 => SaveDtype::Bf16,
                Dtype::F16 => SaveDtype::F16,
            };
            lora.apply(&mut cfg);
            let summary = run_demo(&out, &cfg)?;
            print_summary(&out, &summary);
            Ok(())
        }
        Command::Lora {
            base,
            out,
            tasks,
            seed,
            preset: p,
            init_adapters,
            lora,
        } => {
            let mut cfg = preset(p, seed);
            lora.apply(&mut cfg);
            let tasks = tasks
                .split(',')
                .map(|t| {
                    t.trim()
                        .parse::<Task>()
                        .map_err(|e| TrainError::Config(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let summary = run_adapters(&base, &out, &tasks, init_adapters.as_deref(), &cfg)?;
            print_summary(&out, &summary);
            Ok(())
        }
        Command::Measure {
            vocab,
            shapes,
            batches,
            lens,
            steps,
        } => {
            for spec in shapes.split(',') {
                let d = list(spec)?;
                let [hidden, layers, inter, heads, kv] = d[..] else {
                    return Err(TrainError::Config(format!(
                        "shape `{spec}` needs 5 numbers"
                    )));
                };
                let shape = ModelConfig::llama(LlamaDims {
                    vocab_size: vocab,
                    hidden_size: hidden,
                    intermediate_size: inter,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: kv,
                });
                for &b in &list(&batches)? {
                    for &t in &list(&lens)? {
                        let m = measure(&shape, b, t, steps)?;
                        println!(
                            "shape {spec:>18} params {:>9} batch {b:>3} len {t:>4}: {:>7.3} s/step {:>8.0} tok/s",
                            m.params, m.step_s, m.tokens_per_s
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn print_summary(out: &std::path::Path, s: &DemoSummary) {
    println!("demo written to {}", out.display());
    println!("base: {} parameters, vocabulary {}", s.params, s.vocab_size);
    if let Some(p) = &s.pretrain {
        println!(
            "pretrain: {} steps, loss {:.3} -> {:.3}, {:.0} tok/s",
            p.steps,
            p.first_loss,
            p.final_loss,
            p.tokens_per_s()
        );
    }
    if let Some(acc) = s.copy_accuracy {
        println!("copy probe (held-out list copies, teacher-forced): {acc:.3}");
    }
    for a in &s.adapters {
        for (phase, r) in [("alone", &a.single), ("merge-tuned", &a.merge_tune)] {
            let Some(r) = r else { continue };
            println!(
                "adapter {:>8} {phase:>11}: {} steps, loss {:.3} -> {:.3}, in the merge {}, anchor KL {}, {:.0} target tok/s",
                a.task,
                r.steps,
                r.first_loss,
                r.final_loss,
                r.final_merged_loss
                    .map_or("-".into(), |m| format!("{m:.3}")),
                r.final_anchor_kl.map_or("-".into(), |k| format!("{k:.4}")),
                r.targets_per_s()
            );
        }
    }
    for (phase, secs) in &s.phases {
        println!("time {phase:>18}: {secs:>7.1} s");
    }
    if !s.scores.is_empty() {
        println!("exact match (greedy, held-out)   base  sql    ad     instruct  merged(cat)");
        for t in &s.scores {
            let ads: Vec<String> = t.adapters.iter().map(|(_, v)| format!("{v:.2}")).collect();
            println!(
                "  {:>8}                       {:.2}  {}  {:.2}",
                t.task,
                t.base,
                ads.join("   "),
                t.merged
            );
        }
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_smollm2_preset_is_for_adapters_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("never");
        let args = ["medley-train", "demo", "--preset", "smollm2", "--out"];
        let cli = Cli::try_parse_from(args.iter().copied().chain([out.to_str().unwrap()]));
        let err = run(cli.unwrap()).unwrap_err().to_string();
        assert!(err.contains("lora --preset smollm2"), "{err}");
        assert!(!out.exists());
        let cfg = DemoConfig::smollm2(0);
        assert!(cfg.task_lora.instruct.is_none() && cfg.eval_examples == 0);
        assert_eq!(cfg.anchors.map(|a| a.anchor.batch_size), Some(2));
    }
}
