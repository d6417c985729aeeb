//! The training loops: pretraining every weight of a [`Llama`], and fine-tuning a [`LoraSet`]
//! on a frozen base (optionally anchored to the base's own predictions on other text).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::{Batch, BatchOrder, Sequence};
use crate::lora::{Dropout, LoraSet};
use crate::loss::{masked_cross_entropy, masked_kl_to_base, scalar};
use crate::model::{ForwardOptions, Llama};
use crate::optim::{OptimConfig, Optimizer, ScheduleConfig};
use crate::parallel::{in_parallel, job_pools};
use crate::params::ParamStore;

/// One training run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Sequences are truncated to this many tokens.
    pub max_len: usize,
    /// Warmup steps of the schedule.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Group sequences of similar length into batches (less padding).
    pub group_by_length: bool,
    /// Log the mean loss every this many steps.
    pub log_every: usize,
    /// Seed of the data order (and of LoRA dropout).
    pub seed: u64,
    /// AdamW and clipping.
    pub optim: OptimConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 16,
            max_len: 128,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            group_by_length: true,
            log_every: 10,
            seed: 0,
            optim: OptimConfig::default(),
        }
    }
}

impl TrainConfig {
    fn schedule(&self) -> ScheduleConfig {
        ScheduleConfig {
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

/// Keeps a LoRA adapter close to the base outside its task: each step adds
/// `weight · KL(base ‖ base+adapter)` over a batch of other text (base corpus, other tasks'
/// formats), whose targets are thus the base model's own predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnchorConfig {
    /// Anchor sequences per step.
    pub batch_size: usize,
    /// Weight of the KL term.
    pub weight: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// `(step, mean loss since the previous entry)`, every `log_every` steps and at the end.
    pub losses: Vec<(usize, f64)>,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Mean loss of the last logged window.
    pub final_loss: f64,
    /// Mean anchor KL of the last logged window (LoRA with anchors only).
    pub final_anchor_kl: Option<f64>,
    /// Mean task loss inside the merge with the other adapters, last logged window (LoRA
    /// co-training only).
    pub final_merged_loss: Option<f64>,
    /// Steps run.
    pub steps: usize,
    /// Wall time.
    pub seconds: f64,
    /// Non-padding input tokens processed (anchor batches included).
    pub tokens: usize,
    /// Loss targets of the task batches (the useful tokens).
    pub targets: usize,
}

impl TrainReport {
    /// Input tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    /// Loss targets per second.
    pub fn targets_per_s(&self) -> f64 {
        self.targets as f64 / self.seconds.max(1e-9)
    }
}

/// The optional terms of a LoRA step, logged beside the task loss.
#[derive(Debug, Clone, Copy, Default)]
struct Extras {
    /// Anchor KL.
    kl: Option<f64>,
    /// Task loss inside the merge.
    merged: Option<f64>,
}

/// Running means between log lines.
struct Progress {
    what: String,
    log_every: usize,
    start: Instant,
    /// Sums of the loss, the anchor KL and the merged loss, and the step count.
    window: (f64, f64, f64, usize),
    report: TrainReport,
}

impl Progress {
    fn new(what: String, log_every: usize) -> Self {
        Self {
            what,
            log_every: log_every.max(1),
            start: Instant::now(),
            window: (0.0, 0.0, 0.0, 0),
            report: TrainReport {
                losses: Vec::new(),
                first_loss: f64::NAN,
                final_loss: f64::NAN,
                final_anchor_kl: None,
                final_merged_loss: None,
                steps: 0,
                seconds: 0.0,
                tokens: 0,
                targets: 0,
            },
        }
    }

    fn record(
        &mut self,
        step: usize,
        loss: f64,
        extras: Extras,
        lr: f64,
        batch: (usize, usize),
        last: bool,
    ) -> Result<(), TrainError> {
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step });
        }
        let r = &mut self.report;
        if step == 0 {
            r.first_loss = loss;
        }
        r.steps = step + 1;
        r.tokens += batch.0;
        r.targets += batch.1;
        self.window.0 += loss;
        self.window.1 += extras.kl.unwrap_or(0.0);
        self.window.2 += extras.merged.unwrap_or(0.0);
        self.window.3 += 1;
        if (step + 1).is_multiple_of(self.log_every) || last {
            let n = self.window.3 as f64;
            let mean = self.window.0 / n;
            let mean_kl = extras.kl.map(|_| self.window.1 / n);
            let mean_merged = extras.merged.map(|_| self.window.2 / n);
            r.losses.push((step + 1, mean));
            r.final_loss = mean;
            r.final_anchor_kl = mean_kl;
            r.final_merged_loss = mean_merged;
            r.seconds = self.start.elapsed().as_secs_f64();
            tracing::info!(
                phase = self.what,
                step = step + 1,
                loss = format!("{mean:.4}"),
                anchor_kl = mean_kl.map(|k| format!("{k:.4}")),
                merged_loss = mean_merged.map(|m| format!("{m:.4}")),
                lr = format!("{lr:.2e}"),
                tok_s = format!("{:.0}", r.tokens_per_s()),
                target_tok_s = format!("{:.0}", r.targets_per_s()),
                "train"
            );
            self.window = (0.0, 0.0, 0.0, 0);
        }
        Ok(())
    }

    fn finish(mut self) -> TrainReport {
        self.report.seconds = self.start.elapsed().as_secs_f64();
        self.report
    }
}

/// Picks the sequences of the next batch.
fn next<'a>(order: &mut BatchOrder, data: &'a [Sequence]) -> Vec<&'a Sequence> {
    order
        .next_batch()
        .into_iter()
        .filter_map(|i| data.get(i))
        .collect()
}

fn order(
    data: &[Sequence],
    cfg: &TrainConfig,
    batch_size: usize,
    salt: u64,
) -> Result<BatchOrder, TrainError> {
    let lens = data
        .iter()
        .map(|s| s.tokens.len().min(cfg.max_len))
        .collect();
    BatchOrder::new(lens, batch_size, cfg.group_by_length, cfg.seed ^ salt)
}

/// Trains every weight of `model` on `data` (next-token cross-entropy over each sequence's
/// targets).
pub fn pretrain(
    model: &Llama,
    data: &[Sequence],
    cfg: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    pretrain_probed(model, data, cfg, |_| Ok(()))
}

/// [`pretrain`], calling `probe(step)` after every logged step (e.g. to log a
/// [`crate::probe::CopyProbe`] score while the model trains).
pub fn pretrain_probed(
    model: &Llama,
    data: &[Sequence],
    cfg: &TrainConfig,
    probe: impl FnMut(usize) -> Result<(), TrainError>,
) -> Result<TrainReport, TrainError> {
    let loss_of = |batch: &Batch| {
        let logits = model.forward(&batch.ids, ForwardOptions::default())?;
        masked_cross_entropy(&logits, &batch.targets, &batch.weights, batch.num_targets)
    };
    train_params(model.params(), data, cfg, "pretrain", loss_of, probe)
}

fn train_params(
    params: &ParamStore,
    data: &[Sequence],
    cfg: &TrainConfig,
    what: &'static str,
    mut loss_of: impl FnMut(&Batch) -> Result<candle_core::Tensor, TrainError>,
    mut probe: impl FnMut(usize) -> Result<(), TrainError>,
) -> Result<TrainReport, TrainError> {
    let mut opt = Optimizer::new(params, &cfg.optim, &cfg.schedule())?;
    let mut order = order(data, cfg, cfg.batch_size, 0)?;
    let mut progress = Progress::new(what.to_string(), cfg.log_every);
    tracing::info!(
        phase = what,
        params = params.numel(),
        sequences = data.len(),
        ?cfg,
        "start"
    );
    for step in 0..cfg.steps {
        let seqs = next(&mut order, data);
        let batch = Batch::new(&seqs, cfg.max_len, 0, params.dtype(), params.device())?;
        if batch.num_targets == 0 {
            continue;
        }
        let loss = loss_of(&batch)?;
        let value = scalar(&loss)?;
        let stats = opt.backward_step(&loss)?;
        let last = step + 1 == cfg.steps;
        progress.record(
            step,
            value,
            Extras::default(),
            stats.lr,
            (batch.num_tokens, batch.num_targets),
            last,
        )?;
        if (step + 1).is_multiple_of(progress.log_every) || last {
            probe(step + 1)?;
        }
    }
    Ok(progress.finish())
}

/// Trains the factors of `lora` on `task` with `base` frozen (only the adapter's tensors are
/// given to the optimiser); with `anchors`, adds the KL to the base on anchor text each step.
pub fn train_lora(
    base: &Llama,
    lora: &LoraSet,
    task: &[Sequence],
    anchors: Option<(&[Sequence], &AnchorConfig)>,
    cfg: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    let job = LoraJob {
        label: "lora".into(),
        lora,
        task,
        anchors,
        lr: None,
    };
    train_loras(base, &[job], cfg, None)?
        .pop()
        .flatten()
        .ok_or_else(|| {
            TrainError::Config(format!(
                "a learning rate of {} trains nothing",
                cfg.optim.lr
            ))
        })
}

/// One adapter of [`train_loras`]: its factors, its task's examples and its anchor pool.
#[derive(Debug, Clone)]
pub struct LoraJob<'a> {
    /// Name in the logs (the task id).
    pub label: String,
    /// The factors trained.
    pub lora: &'a LoraSet,
    /// The adapter's own task: the only examples whose targets it learns.
    pub task: &'a [Sequence],
    /// Anchor pool and settings (KL to the base, see [`AnchorConfig`]).
    pub anchors: Option<(&'a [Sequence], &'a AnchorConfig)>,
    /// Its peak learning rate, if not [`TrainConfig::optim`]'s. A rate of 0 holds the adapter
    /// fixed: it takes no steps (and gets no report) but stays in the others' merge.
    pub lr: Option<f64>,
}

/// Merge-aware co-training of several adapters (see [`train_loras`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoTrainConfig {
    /// Weight of the loss on the adapter's task with the other adapters' current updates added
    /// (the `cat` merge with weight 1 each); the adapter alone keeps weight 1.
    pub merged_weight: f64,
}

/// The running state of one [`LoraJob`].
struct JobState<'a> {
    job: &'a LoraJob<'a>,
    opt: Optimizer,
    order: BatchOrder,
    anchor: Option<(BatchOrder, &'a [Sequence], &'a AnchorConfig)>,
    dropout: Dropout,
    progress: Progress,
    /// The job's settings: the common ones with its seed and learning rate.
    cfg: TrainConfig,
}

/// Trains several adapters on one frozen `base`, a step of each at once (one thread and rayon
/// pool each; one job steps on the calling thread). Each adapter learns only from its own
/// task's examples (and its anchors). With `co_train`, each step also scores the adapter's task
/// batch with the *other* adapters' updates as the step began added, detached, and adds that
/// loss times [`CoTrainConfig::merged_weight`]: the adapter learns its task both
/// alone and inside the merge of all of them, so the merged updates stop undoing each other.
/// Job `i` draws its data order and dropout from `cfg.seed ^ i` (one job: exactly
/// [`train_lora`]). A job held fixed ([`LoraJob::lr`] 0) reports `None`.
pub fn train_loras(
    base: &Llama,
    jobs: &[LoraJob<'_>],
    cfg: &TrainConfig,
    co_train: Option<&CoTrainConfig>,
) -> Result<Vec<Option<TrainReport>>, TrainError> {
    let base = &base.frozen();
    let mut states = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let seeded = TrainConfig {
            seed: cfg.seed ^ i as u64,
            optim: OptimConfig {
                lr: job.lr.unwrap_or(cfg.optim.lr),
                ..cfg.optim.clone()
            },
            ..cfg.clone()
        };
        if seeded.optim.lr == 0.0 {
            tracing::info!(adapter = job.label, "held fixed");
            states.push(None);
            continue;
        }
        states.push(Some(job_state(job, seeded, co_train)?));
    }
    let trained = states.iter().flatten().count();
    // A single job needs no threads of its own (the concurrent singles already run in one).
    let pools = if trained > 1 {
        job_pools(trained)?
    } else {
        Vec::new()
    };
    for step in 0..cfg.steps {
        // Every job's view of the others is taken before any of them steps (a copy: `concat`
        // stores new tensors), so the jobs of a step are independent and run at once.
        let mut items = Vec::with_capacity(trained);
        for (i, state) in states.iter_mut().enumerate() {
            let Some(state) = state else { continue };
            let others = match co_train {
                Some(c) if jobs.len() > 1 => {
                    let parts: Vec<(&LoraSet, f64)> = jobs
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, j)| (j.lora, 1.0))
                        .collect();
                    Some((LoraSet::concat(&parts)?, c.merged_weight))
                }
                _ => None,
            };
            items.push((state, others));
        }
        let step_one = |(state, other): (&mut JobState<'_>, Option<(LoraSet, f64)>)| {
            let other = other.as_ref().map(|(set, w)| (set, *w));
            lora_step(base, state, other, step)
        };
        if pools.is_empty() {
            items.into_iter().try_for_each(step_one)?;
        } else {
            in_parallel(items, &pools, step_one)?;
        }
    }
    Ok(states
        .into_iter()
        .map(|s| s.map(|s| s.progress.finish()))
        .collect())
}

/// The starting state of one job of [`train_loras`], with its own seed and learning rate.
fn job_state<'a>(
    job: &'a LoraJob<'a>,
    seeded: TrainConfig,
    co_train: Option<&CoTrainConfig>,
) -> Result<JobState<'a>, TrainError> {
    let params = job.lora.params();
    let anchor = match job.anchors {
        Some((data, a)) if a.batch_size > 0 && !data.is_empty() => {
            Some((order(data, &seeded, a.batch_size, 0xa11c)?, data, a))
        }
        _ => None,
    };
    tracing::info!(
        adapter = job.label,
        lora_params = params.numel(),
        sequences = job.task.len(),
        anchors = job.anchors.map(|(d, _)| d.len()),
        cfg = ?seeded,
        ?co_train,
        lora = ?job.lora.config(),
        "start"
    );
    Ok(JobState {
        job,
        opt: Optimizer::new(params, &seeded.optim, &seeded.schedule())?,
        order: order(job.task, &seeded, seeded.batch_size, 0)?,
        anchor,
        dropout: Dropout::new(job.lora.config().dropout, seeded.seed),
        progress: Progress::new(job.label.clone(), seeded.log_every),
        cfg: seeded,
    })
}

/// One optimiser step of one adapter: its task loss alone, plus the anchor KL and the loss
/// inside the merge (`others`: the detached sum of the other adapters, and the term's weight).
fn lora_step(
    base: &Llama,
    st: &mut JobState<'_>,
    others: Option<(&LoraSet, f64)>,
    step: usize,
) -> Result<(), TrainError> {
    let lora = st.job.lora;
    let cfg = &st.cfg;
    let (dtype, device) = (lora.params().dtype(), lora.params().device());
    let seqs = next(&mut st.order, st.job.task);
    let batch = Batch::new(&seqs, cfg.max_len, 0, dtype, device)?;
    if batch.num_targets == 0 {
        return Ok(());
    }
    let task_loss = |frozen: Option<&LoraSet>, dropout: &mut Dropout| {
        let opts = ForwardOptions {
            lora: Some(lora),
            dropout: Some(dropout),
            frozen,
        };
        let logits = base.forward(&batch.ids, opts)?;
        masked_cross_entropy(&logits, &batch.targets, &batch.weights, batch.num_targets)
    };
    // Term by term, each backpropagated before the next forward pass: one graph alive at a
    // time, which matters on a large model (see `crate::smollm2` for what memory the anchor's
    // full-vocabulary KL takes).
    let loss = task_loss(None, &mut st.dropout)?;
    let mut extras = Extras {
        kl: None,
        merged: None,
    };
    let value = scalar(&loss)?;
    st.opt.accumulate(&loss)?;
    drop(loss);
    let mut tokens = batch.num_tokens;
    if let Some((set, weight)) = others {
        let merged = task_loss(Some(set), &mut st.dropout)?;
        extras.merged = Some(scalar(&merged)?);
        st.opt.accumulate(&(merged * weight)?)?;
        tokens += batch.num_tokens;
    }
    if let Some((ord, data, a)) = st.anchor.as_mut() {
        let seqs = next(ord, data);
        let ab = Batch::new(&seqs, cfg.max_len, 0, dtype, device)?;
        let base_logits = base.forward(&ab.ids, ForwardOptions::default())?.detach();
        let opts = ForwardOptions {
            lora: Some(lora),
            dropout: Some(&mut st.dropout),
            frozen: None,
        };
        let logits = base.forward(&ab.ids, opts)?;
        let kl = masked_kl_to_base(&logits, &base_logits, &ab.weights, ab.num_targets)?;
        extras.kl = Some(scalar(&kl)?);
        st.opt.accumulate(&(kl * a.weight)?)?;
        tokens += ab.num_tokens;
    }
    let stats = st.opt.step_accumulated()?;
    let last = step + 1 == cfg.steps;
    st.progress.record(
        step,
        value,
        extras,
        stats.lr,
        (tokens, batch.num_targets),
        last,
    )
}

#[cfg(test)]
#[path = "train_tests.rs"]
pub(crate) mod tests;
