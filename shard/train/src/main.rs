//! `medley-train`: trains the demo's base model and adapters.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use medley_demo::Task;
use medley_train::adapters::{TaskLora, TaskSteps};
use medley_train::demo::{DemoConfig, DemoSummary, run_adapters, run_demo};
use medley_train::measure::measure;
use medley_train::{LlamaShape, SaveDtype, TrainError};

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

/// Pretraining settings that override the preset's.
#[derive(clap::Args)]
struct PretrainOverrides {
    /// Pretraining steps.
    #[arg(long)]
    pretrain_steps: Option<usize>,
    /// Peak learning rate of pretraining.
    #[arg(long)]
    pretrain_lr: Option<f64>,
    /// Pretraining sequences per step.
    #[arg(long)]
    pretrain_batch: Option<usize>,
    /// Tokens per packed pretraining window.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Base corpus documents.
    #[arg(long)]
    corpus_docs: Option<usize>,
    /// Fraction of the corpus documents replaced by list copies.
    #[arg(long)]
    copy_docs: Option<f64>,
    /// Steps of the list-copy stage before pretraining.
    #[arg(long)]
    copy_stage_steps: Option<usize>,
    /// Fraction of the other documents written twice in a row.
    #[arg(long)]
    repeat_docs: Option<f64>,
}

impl PretrainOverrides {
    fn apply(&self, cfg: &mut DemoConfig) {
        if let Some(n) = self.pretrain_steps {
            cfg.pretrain.steps = n;
        }
        if let Some(lr) = self.pretrain_lr {
            cfg.pretrain.optim.lr = lr;
        }
        if let Some(b) = self.pretrain_batch {
            cfg.pretrain.batch_size = b;
        }
        if let Some(n) = self.seq_len {
            cfg.seq_len = n;
            cfg.pretrain.max_len = n + 1;
        }
        if let Some(n) = self.corpus_docs {
            cfg.corpus_docs = n;
        }
        if let Some(f) = self.copy_docs {
            cfg.copy_docs = f;
        }
        if let Some(n) = self.copy_stage_steps {
            cfg.copy_stage_steps = n;
        }
        if let Some(f) = self.repeat_docs {
            cfg.repeat_docs = f;
        }
    }
}

/// Adapter settings that override the preset's.
#[derive(clap::Args)]
struct LoraOverrides {
    /// Steps of each adapter trained alone (replaces the preset's per-task steps too; see
    /// `--task-steps`).
    #[arg(long)]
    lora_steps: Option<usize>,
    /// Peak learning rate of the adapters.
    #[arg(long)]
    lora_lr: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    dropout: Option<f64>,
    /// AdamW weight decay of the adapters.
    #[arg(long)]
    lora_weight_decay: Option<f64>,
    /// Weight of the KL-to-base anchor term (turns anchoring on when the preset has none).
    #[arg(long)]
    anchor_weight: Option<f64>,
    /// Anchor sequences per step.
    #[arg(long)]
    anchor_batch: Option<usize>,
    /// Train the adapters without KL anchoring to the base.
    #[arg(long)]
    no_anchors: bool,
    /// Anchor the adapters' training alone as well (the preset anchors their merge-tuning only).
    #[arg(long)]
    anchor_singles: bool,
    /// Weight of the loss inside the merge in co-training.
    #[arg(long)]
    merged_weight: Option<f64>,
    /// Steps of the merge-aware co-training that follows the single adapters' training.
    #[arg(long)]
    merge_tune_steps: Option<usize>,
    /// Peak learning rate of that co-training.
    #[arg(long)]
    merge_tune_lr: Option<f64>,
    /// Train each adapter on its own only, without the merge-aware co-training after it.
    #[arg(long)]
    no_co_train: bool,
    /// Steps of single adapters that differ from `--lora-steps`, e.g. `instruct=6000,ad=2000`
    /// (adapters trained without co-training).
    #[arg(long, value_parser = parse_task_steps, value_delimiter = ',')]
    task_steps: Vec<(Task, usize)>,
    /// Adapters whose rank, alpha and peak learning rate differ from the others', e.g.
    /// `instruct=16:32:3e-3` (`--rank`, `--alpha` or `--lora-lr` alone replace the preset's
    /// per-task values too).
    #[arg(long, value_parser = parse_task_lora, value_delimiter = ',')]
    task_lora: Vec<(Task, TaskLora)>,
    /// Sequences per adapter batch.
    #[arg(long)]
    lora_batch: Option<usize>,
    /// Draw adapter batches uniformly instead of grouping sequences of similar length (which
    /// pads less but, on a task whose kinds differ in length, fills a batch with one kind).
    #[arg(long)]
    no_group_by_length: bool,
    /// Training examples per task.
    #[arg(long)]
    examples: Option<usize>,
    /// Held-out examples per task for the closing exact-match check (0 skips it).
    #[arg(long)]
    eval_examples: Option<usize>,
}

impl LoraOverrides {
    fn apply(&self, cfg: &mut DemoConfig) {
        let set = |dst: &mut f64, v: Option<f64>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        if let Some(n) = self.lora_steps {
            cfg.lora_train.steps = n;
            cfg.task_steps = TaskSteps::default();
        }
        if self.rank.is_some() || self.alpha.is_some() || self.lora_lr.is_some() {
            cfg.task_lora = Default::default();
        }
        set(&mut cfg.lora_train.optim.lr, self.lora_lr);
        set(
            &mut cfg.lora_train.optim.weight_decay,
            self.lora_weight_decay,
        );
        if let Some(r) = self.rank {
            cfg.lora.rank = r;
        }
        set(&mut cfg.lora.alpha, self.alpha);
        set(&mut cfg.lora.dropout, self.dropout);
        if let (None, Some(w)) = (&cfg.anchors, self.anchor_weight) {
            cfg.anchors = Some(medley_train::demo::AnchorMix::standard(w));
        }
        if let Some(a) = cfg.anchors.as_mut() {
            set(&mut a.anchor.weight, self.anchor_weight);
            if let Some(b) = self.anchor_batch {
                a.anchor.batch_size = b;
            }
            a.in_singles |= self.anchor_singles;
        }
        if self.no_anchors {
            cfg.anchors = None;
        }
        if let Some(t) = cfg.merge_tune.as_mut() {
            set(&mut t.co_train.merged_weight, self.merged_weight);
            set(&mut t.lr, self.merge_tune_lr);
            if let Some(n) = self.merge_tune_steps {
                t.steps = n;
            }
        }
        if self.no_co_train {
            cfg.merge_tune = None;
        }
        for &(task, n) in &self.task_steps {
            cfg.task_steps.set(task, n);
        }
        for (task, t) in &self.task_lora {
            cfg.task_lora.set(*task, t.clone());
        }
        if let Some(n) = self.lora_batch {
            cfg.lora_train.batch_size = n;
        }
        if self.no_group_by_length {
            cfg.lora_train.group_by_length = false;
        }
        if let Some(n) = self.examples {
            cfg.examples_per_task = n;
        }
        if let Some(n) = self.eval_examples {
            cfg.eval_examples = n;
        }
    }
}

/// `task=steps`, as `--task-steps` takes it.
fn parse_task_steps(s: &str) -> Result<(Task, usize), String> {
    let (task, steps) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not TASK=STEPS"))?;
    let task = task.trim().parse::<Task>().map_err(|e| e.to_string())?;
    let steps = steps
        .trim()
        .parse::<usize>()
        .map_err(|e| format!("steps of {task}: {e}"))?;
    Ok((task, steps))
}

/// `task=rank:alpha:lr`, as `--task-lora` takes it.
fn parse_task_lora(s: &str) -> Result<(Task, TaskLora), String> {
    let (task, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not TASK=RANK:ALPHA:LR"))?;
    let task = task.trim().parse::<Task>().map_err(|e| e.to_string())?;
    let parts: Vec<&str> = v.split(':').map(str::trim).collect();
    let [rank, alpha, lr] = parts.as_slice() else {
        return Err(format!("{v:?} of {task} is not RANK:ALPHA:LR"));
    };
    let rank = rank
        .parse::<usize>()
        .ok()
        .filter(|&r| r > 0)
        .ok_or_else(|| format!("rank of {task}: {rank:?} is not a positive integer"))?;
    let num = |what: &str, x: &str| {
        x.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("{what} of {task}: {x:?} is not a positive number"))
    };
    let alpha = num("alpha", alpha)?;
    let lr = num("learning rate", lr)?;
    Ok((task, TaskLora { rank, alpha, lr }))
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
                let shape = LlamaShape::new(vocab, hidden, inter, layers, heads, kv);
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

    /// The preset after `medley-train lora --base b --out o ARGS`.
    fn lora_cfg(args: &[&str]) -> DemoConfig {
        let base = ["medley-train", "lora", "--base", "b", "--out", "o"];
        let cli = Cli::try_parse_from(base.iter().chain(args)).unwrap();
        let Command::Lora { lora, .. } = cli.command else {
            panic!("not lora")
        };
        let mut cfg = DemoConfig::full(0);
        lora.apply(&mut cfg);
        cfg
    }

    #[test]
    fn task_steps_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_task_steps("instruct=6000").unwrap(),
            (Task::Instruct, 6000)
        );
        assert_eq!(parse_task_steps(" sql = 0 ").unwrap(), (Task::Sql, 0));
        assert!(
            parse_task_steps("instruct")
                .unwrap_err()
                .contains("TASK=STEPS")
        );
        assert!(parse_task_steps("poem=3").unwrap_err().contains("poem"));
        assert!(
            parse_task_steps("ad=-1")
                .unwrap_err()
                .contains("steps of ad")
        );
        let cfg = lora_cfg(&["--lora-steps", "1", "--task-steps", "instruct=10,ad=0"]);
        assert_eq!(cfg.task_steps.get_or(Task::Instruct, 1), 10);
        assert_eq!(cfg.task_steps.get_or(Task::Ad, 1), 0);
        assert_eq!(cfg.task_steps.get_or(Task::Sql, 1), 1);
        // `--lora-steps` alone means every adapter, the preset's longer `instruct` included.
        assert!(DemoConfig::full(0).task_steps.get_or(Task::Instruct, 0) > 0);
        let cfg = lora_cfg(&["--lora-steps", "7"]);
        let steps = cfg.lora_train.steps;
        assert_eq!(steps, 7);
        assert_eq!(cfg.task_steps.get_or(Task::Instruct, steps), 7);
    }

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
    }

    #[test]
    fn task_lora_parses_or_says_what_is_wrong() {
        let (task, t) = parse_task_lora("instruct=16:32:3e-3").unwrap();
        assert_eq!(task, Task::Instruct);
        assert_eq!((t.rank, t.alpha, t.lr), (16, 32.0, 3e-3));
        let err = |s: &str| parse_task_lora(s).unwrap_err();
        assert!(err("instruct").contains("TASK=RANK:ALPHA:LR"));
        assert!(err("sql=16:32").contains("RANK:ALPHA:LR"));
        assert!(err("sql=0:32:1e-3").contains("rank of sql"));
        assert!(err("ad=8:x:1e-3").contains("alpha of ad"));
        assert!(err("ad=8:16:-1").contains("learning rate of ad"));
        assert!(err("poem=8:16:1e-3").contains("poem"));
        // The preset anchors merge-tuning only.
        let anchors = |args: &[&str]| lora_cfg(args).anchors.map(|a| a.in_singles);
        assert_eq!(anchors(&[]), Some(false));
        assert_eq!(anchors(&["--anchor-singles"]), Some(true));
        assert_eq!(anchors(&["--no-anchors"]), None);
        // The preset's `instruct` adapter is larger; `--rank` means every adapter.
        let preset = lora_cfg(&[]);
        assert!(preset.task_lora.instruct.is_some());
        assert!(lora_cfg(&["--rank", "4"]).task_lora.instruct.is_none());
        let cfg = lora_cfg(&["--rank", "4", "--task-lora", "sql=2:4:1e-3"]);
        assert_eq!(cfg.lora.rank, 4);
        assert_eq!(cfg.task_lora.sql.as_ref().map(|t| t.rank), Some(2));
        assert!(cfg.task_lora.instruct.is_none());
    }
}
