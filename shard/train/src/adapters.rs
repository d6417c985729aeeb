//! The adapter phase of the demo: one LoRA adapter per task, trained on its own first (all
//! tasks at once, one thread each), then tuned together inside their merge.
//!
//! Two phases because they cost so differently. A single adapter is one forward and backward
//! pass per step, and the three run concurrently (the ops of a model this small do not use a
//! second core, separate jobs do). Merge-aware co-training ([`train_loras`] with a
//! [`CoTrainConfig`]) is two passes per adapter and step, in turn; run from scratch it paid that
//! price for every step. Adapters trained apart reach 100% on `sql` and `ad` but their `cat`
//! merge scores 0 on every task: each rewrites the others' prompts. A short co-training from the
//! trained singles ([`MergeTune`]) teaches them to leave each other's formats alone.

use std::path::Path;

use medley_demo::Task;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::TrainError;
use crate::data::Sequence;
use crate::demo::{DemoConfig, task_sequences};
use crate::lora::{LoraConfig, LoraSet};
use crate::model::Llama;
use crate::parallel::{in_parallel, job_pools};
use crate::save::{AdapterMeta, read_adapter, write_adapter};
use crate::train::{CoTrainConfig, LoraJob, TrainConfig, TrainReport, train_loras};

/// A setting that some tasks' adapters override (`None`: the task uses the common value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PerTask<T> {
    /// The `sql` adapter's.
    pub sql: Option<T>,
    /// The `ad` adapter's.
    pub ad: Option<T>,
    /// The `instruct` adapter's.
    pub instruct: Option<T>,
}

impl<T> Default for PerTask<T> {
    fn default() -> Self {
        Self {
            sql: None,
            ad: None,
            instruct: None,
        }
    }
}

impl<T: Clone> PerTask<T> {
    /// `task`'s value, if set.
    pub fn get(&self, task: Task) -> Option<&T> {
        match task {
            Task::Sql => self.sql.as_ref(),
            Task::Ad => self.ad.as_ref(),
            Task::Instruct => self.instruct.as_ref(),
        }
    }

    /// `task`'s value, `default` unless set.
    pub fn get_or(&self, task: Task, default: T) -> T {
        self.get(task).cloned().unwrap_or(default)
    }

    /// Sets `task`'s value.
    pub fn set(&mut self, task: Task, value: T) {
        let slot = match task {
            Task::Sql => &mut self.sql,
            Task::Ad => &mut self.ad,
            Task::Instruct => &mut self.instruct,
        };
        *slot = Some(value);
    }
}

/// Adapter steps per task, where one differs from [`TrainConfig::steps`] of
/// [`DemoConfig::lora_train`] (0 skips the task's single training, e.g. to only merge-tune
/// adapters read with [`AdapterInputs::init`]).
pub type TaskSteps = PerTask<usize>;

/// The size and learning rate of one task's adapter, where they differ from [`DemoConfig::lora`]
/// and [`DemoConfig::lora_train`] (a harder task may need a larger rank; a larger rank, a lower
/// learning rate). The `cat` merge concatenates adapters of any ranks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskLora {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Peak learning rate of its training alone.
    pub lr: f64,
}

/// The second phase: all adapters co-trained inside their merge, starting from the singles.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeTune {
    /// The merge term's weight.
    pub co_train: CoTrainConfig,
    /// Steps (of every adapter at once).
    pub steps: usize,
    /// Peak learning rate (warmup and decay of [`DemoConfig::lora_train`]).
    pub lr: f64,
    /// Adapters whose peak learning rate differs from [`Self::lr`]. A rate of 0 holds an adapter
    /// as it was trained alone: the others still learn to merge with it.
    pub task_lr: PerTask<f64>,
}

/// What the adapter phase works on.
#[derive(Clone, Copy)]
pub struct AdapterInputs<'a> {
    /// The frozen base.
    pub base: &'a Llama,
    /// Its tokenizer.
    pub tok: &'a Tokenizer,
    /// Base-corpus windows (the anchors' share; empty without anchoring).
    pub corpus: &'a [Sequence],
    /// The tasks to train adapters for.
    pub tasks: &'a [Task],
    /// Start from the adapters in `DIR/<task>/` (PEFT directories of the same shape) instead of
    /// a fresh initialisation.
    pub init: Option<&'a Path>,
    /// Write each adapter trained alone to `DIR/<task>/` before the merge-tuning (e.g.
    /// `OUT/`[`ALONE_DIR`]): a merge-tuning that fails loses none of that training, and the
    /// adapters before and after it can be compared.
    pub alone_out: Option<&'a Path>,
}

/// Where the demo writes its adapters as trained alone, under its output directory, when
/// merge-tuning follows (the merge-tuned ones go to `OUT/adapters/`).
pub const ALONE_DIR: &str = "adapters-alone";

/// One trained adapter and how its phases went.
pub struct TrainedAdapter {
    /// Its task.
    pub task: Task,
    /// The adapter.
    pub lora: LoraSet,
    /// Training on its task alone (`None`: skipped).
    pub single: Option<TrainReport>,
    /// Co-training inside the merge (`None`: skipped).
    pub merge_tune: Option<TrainReport>,
}

/// One task's adapter training inputs: its examples and its anchor pool (the first corpus
/// windows and the other tasks' examples, see [`crate::demo::AnchorMix`]).
struct TaskData {
    task: Task,
    examples: Vec<Sequence>,
    pool: Vec<Sequence>,
}

fn task_data(
    tok: &Tokenizer,
    corpus: &[Sequence],
    task: Task,
    cfg: &DemoConfig,
) -> Result<TaskData, TrainError> {
    let examples = task_sequences(tok, task, cfg.seed, cfg.examples_per_task, false)?;
    let mut pool = Vec::new();
    if let Some(mix) = &cfg.anchors {
        pool.extend(corpus.iter().take(mix.corpus_windows).cloned());
        for other in Task::ALL.into_iter().filter(|t| *t != task) {
            pool.extend(task_sequences(
                tok,
                other,
                cfg.seed ^ 0x5eed,
                mix.other_task_examples,
                true,
            )?);
        }
    }
    Ok(TaskData {
        task,
        examples,
        pool,
    })
}

/// A fresh adapter for `task`, or the one in `init/<task>/`.
fn initial_adapter(
    inp: &AdapterInputs<'_>,
    task: Task,
    cfg: &DemoConfig,
) -> Result<LoraSet, TrainError> {
    let mut lora_cfg = LoraConfig {
        seed: cfg.lora.seed ^ (task as u64 + 1),
        ..cfg.lora.clone()
    };
    if let Some(t) = cfg.task_lora.get(task) {
        lora_cfg.rank = t.rank;
        lora_cfg.alpha = t.alpha;
    }
    let set = LoraSet::init(
        inp.base.shape(),
        &lora_cfg,
        inp.base.params().dtype(),
        inp.base.params().device(),
    )?;
    if let Some(dir) = inp.init {
        read_adapter(&dir.join(task.id()), &set)?;
    }
    Ok(set)
}

/// Trains the adapters of `inp.tasks`: each on its own task (concurrently), then, with
/// [`DemoConfig::merge_tune`] and more than one task, co-trained inside their merge.
pub fn train_task_adapters(
    inp: &AdapterInputs<'_>,
    cfg: &DemoConfig,
) -> Result<Vec<TrainedAdapter>, TrainError> {
    let data = inp
        .tasks
        .iter()
        .map(|&t| task_data(inp.tok, inp.corpus, t, cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let sets = data
        .iter()
        .map(|d| initial_adapter(inp, d.task, cfg))
        .collect::<Result<Vec<_>, _>>()?;
    // Jobs of one phase: anchored when `cfg.anchors` is set, in the single phase only if it says
    // so; merge-tuned at their own rates where `MergeTune::task_lr` sets one.
    let jobs_of = |single: bool| -> Vec<LoraJob<'_>> {
        data.iter()
            .zip(&sets)
            .map(|(d, lora)| LoraJob {
                label: d.task.id().into(),
                lora,
                task: &d.examples,
                anchors: cfg
                    .anchors
                    .as_ref()
                    .filter(|mix| !single || mix.in_singles)
                    .map(|mix| (d.pool.as_slice(), &mix.anchor)),
                lr: match &cfg.merge_tune {
                    Some(tune) if !single => tune.task_lr.get(d.task).copied(),
                    _ => None,
                },
            })
            .collect()
    };
    let singles: Vec<TrainConfig> = data
        .iter()
        .map(|d| {
            let mut c = TrainConfig {
                steps: cfg.task_steps.get_or(d.task, cfg.lora_train.steps),
                ..cfg.lora_train.clone()
            };
            if let Some(t) = cfg.task_lora.get(d.task) {
                c.optim.lr = t.lr;
            }
            c
        })
        .collect();
    let single_reports = train_concurrently(inp.base, &jobs_of(true), &singles)?;
    let jobs = jobs_of(false);
    let tune_reports = match &cfg.merge_tune {
        Some(tune) if jobs.len() > 1 && tune.steps > 0 => {
            if let Some(dir) = inp.alone_out {
                let meta = AdapterMeta {
                    base_model_name_or_path: Some(cfg.base_model_name.clone()),
                };
                for ((d, lora), report) in data.iter().zip(&sets).zip(&single_reports) {
                    if report.is_some() {
                        write_adapter(&dir.join(d.task.id()), lora, &meta)?;
                    }
                }
            }
            let mut tcfg = TrainConfig {
                steps: tune.steps,
                ..cfg.lora_train.clone()
            };
            tcfg.optim.lr = tune.lr;
            train_loras(inp.base, &jobs, &tcfg, Some(&tune.co_train))?
        }
        _ => vec![None; jobs.len()],
    };
    drop(jobs);
    Ok(data
        .into_iter()
        .zip(sets)
        .zip(single_reports.into_iter().zip(tune_reports))
        .map(|((d, lora), (single, merge_tune))| TrainedAdapter {
            task: d.task,
            lora,
            single,
            merge_tune,
        })
        .collect())
}

/// Trains independent adapters at the same time, one thread each ([`job_pools`]), each with its
/// own steps; each job's data order, dropout and result are those of training it alone. A job
/// of 0 steps is skipped (`None`).
fn train_concurrently(
    base: &Llama,
    jobs: &[LoraJob<'_>],
    cfgs: &[TrainConfig],
) -> Result<Vec<Option<TrainReport>>, TrainError> {
    let items: Vec<_> = jobs.iter().zip(cfgs).filter(|(_, c)| c.steps > 0).collect();
    let pools = job_pools(items.len())?;
    let mut reports = in_parallel(items, &pools, |(job, cfg)| {
        Ok(train_loras(base, std::slice::from_ref(job), cfg, None)?
            .into_iter()
            .next()
            .flatten())
    })?
    .into_iter();
    Ok(cfgs
        .iter()
        .map(|c| {
            if c.steps > 0 {
                reports.next().flatten()
            } else {
                None
            }
        })
        .collect())
}
