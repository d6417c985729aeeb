//! `medley-train`'s command-line settings that override a preset's ([`DemoConfig`]).

use clap::Args;
use medley_demo::Task;
use medley_train::adapters::{TaskLora, TaskSteps};
use medley_train::demo::{AnchorMix, DemoConfig};

/// Pretraining settings that override the preset's.
#[derive(Args)]
pub struct PretrainOverrides {
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
    pub fn apply(&self, cfg: &mut DemoConfig) {
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
#[derive(Args)]
pub struct LoraOverrides {
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
    /// Adapters merge-tuned at another peak learning rate, e.g. `instruct=0` (0 holds the
    /// adapter as trained alone; the others still learn to merge with it).
    #[arg(long, value_parser = parse_task_lr, value_delimiter = ',')]
    merge_tune_task_lr: Vec<(Task, f64)>,
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
    pub fn apply(&self, cfg: &mut DemoConfig) {
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
            cfg.anchors = Some(AnchorMix::standard(w));
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
            for &(task, lr) in &self.merge_tune_task_lr {
                t.task_lr.set(task, lr);
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
    parse_task_value(s, "STEPS")
}

/// `task=lr`, as `--merge-tune-task-lr` takes it.
fn parse_task_lr(s: &str) -> Result<(Task, f64), String> {
    let (task, lr) = parse_task_value::<f64>(s, "LR")?;
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(format!("lr of {task}: {lr} is not 0 or a positive number"));
    }
    Ok((task, lr))
}

/// `task=value` (`what` names the value in the error).
fn parse_task_value<T>(s: &str, what: &str) -> Result<(Task, T), String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let (task, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not TASK={what}"))?;
    let task = task.trim().parse::<Task>().map_err(|e| e.to_string())?;
    let v = v
        .trim()
        .parse::<T>()
        .map_err(|e| format!("{} of {task}: {e}", what.to_lowercase()))?;
    Ok((task, v))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lora: LoraOverrides,
    }

    /// The full preset after the adapter flags `ARGS`.
    fn lora_cfg(args: &[&str]) -> DemoConfig {
        let cli = Cli::try_parse_from(std::iter::once("medley-train").chain(args.iter().copied()));
        let mut cfg = DemoConfig::full(0);
        cli.unwrap().lora.apply(&mut cfg);
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

    #[test]
    fn merge_tune_task_lr_parses_and_applies() {
        assert_eq!(parse_task_lr("instruct=0").unwrap(), (Task::Instruct, 0.0));
        assert!(parse_task_lr("ad=-1e-3").unwrap_err().contains("lr of ad"));
        assert!(parse_task_lr("ad=inf").unwrap_err().contains("lr of ad"));
        assert!(parse_task_lr("sql").unwrap_err().contains("TASK=LR"));
        let cfg = lora_cfg(&["--merge-tune-task-lr", "instruct=0,sql=1e-3"]);
        let tune = cfg.merge_tune.unwrap();
        assert_eq!(tune.task_lr.get(Task::Instruct), Some(&0.0));
        assert_eq!(tune.task_lr.get(Task::Sql), Some(&1e-3));
        assert_eq!(tune.task_lr.get(Task::Ad), None);
    }
}
