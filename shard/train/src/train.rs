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
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::lora::LoraConfig;
    use crate::model::InitConfig;
    use crate::shape::LlamaShape;
    use candle_core::{DType, Device};

    /// Arithmetic progressions mod 32 with a step in 1..=3: after two tokens every next token is
    /// determined, so a model that learns the pattern drives the loss far below ln(32).
    pub(crate) fn progressions(n: usize, len: usize, seed: u64) -> Vec<Sequence> {
        use rand::Rng;
        let mut rng = crate::params::stream(seed, "progressions");
        (0..n)
            .map(|_| {
                let (s, d) = (rng.random_range(0..32u32), rng.random_range(1..4u32));
                Sequence::all((0..len as u32).map(|i| (s + i * d) % 32).collect())
            })
            .collect()
    }

    pub(crate) fn tiny() -> LlamaShape {
        LlamaShape::new(32, 32, 64, 2, 4, 2)
    }

    fn cfg(steps: usize) -> TrainConfig {
        TrainConfig {
            steps,
            batch_size: 8,
            max_len: 16,
            warmup_steps: 5,
            log_every: 20,
            seed: 7,
            optim: OptimConfig {
                lr: 1e-2,
                ..OptimConfig::default()
            },
            ..TrainConfig::default()
        }
    }

    fn run(seed: u64) -> (TrainReport, Vec<f32>) {
        let data = progressions(256, 16, 1);
        let init = InitConfig { seed, std: 0.05 };
        let model = Llama::init(&tiny(), init, DType::F32, &Device::Cpu).unwrap();
        let report = pretrain(&model, &data, &cfg(120)).unwrap();
        let w = model
            .params()
            .get("model.layers.1.mlp.down_proj.weight")
            .unwrap();
        (report, w.flatten_all().unwrap().to_vec1().unwrap())
    }

    /// The reduced run learns (final loss < 40% of the first) and is bit-reproducible.
    #[test]
    fn pretraining_loss_falls_and_is_reproducible() {
        let (a, wa) = run(3);
        assert!(
            a.final_loss < 0.4 * a.first_loss,
            "loss {} -> {}",
            a.first_loss,
            a.final_loss
        );
        let (b, wb) = run(3);
        assert_eq!(a.losses, b.losses, "same seed, same losses (bit for bit)");
        assert_eq!(wa, wb, "same seed, same weights (bit for bit)");
    }

    /// LoRA training changes only the adapter: every base tensor keeps its exact values, every
    /// `B` moves away from zero and the task loss falls.
    #[test]
    fn lora_training_leaves_the_base_untouched() {
        let model = Llama::init(&tiny(), InitConfig::default(), DType::F32, &Device::Cpu).unwrap();
        let before = model.params().snapshot(DType::F32).unwrap();
        let lora_cfg = LoraConfig {
            dropout: 0.1,
            ..LoraConfig::default()
        };
        let lora = LoraSet::init(model.shape(), &lora_cfg, DType::F32, &Device::Cpu).unwrap();
        let a_before = lora.params().snapshot(DType::F32).unwrap();
        let data = progressions(64, 12, 2);
        let anchors = progressions(16, 12, 3);
        let anchor = AnchorConfig {
            batch_size: 2,
            weight: 0.5,
        };
        let report = train_lora(&model, &lora, &data, Some((&anchors, &anchor)), &cfg(30)).unwrap();
        assert!(report.final_loss < report.first_loss);
        assert!(report.final_anchor_kl.is_some());
        for (name, t) in &before {
            let now = model.params().get(name).unwrap();
            let same = (t - &now).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{name} changed");
        }
        for (name, var) in lora.params().iter() {
            let moved = (var.as_tensor() - &a_before[name]).unwrap().abs().unwrap();
            let moved = moved.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 0.0, "{name} did not train");
        }
    }

    /// `[marker, s, s + step, ...] mod 32`, the prompt being `[marker, s]`: on a base that
    /// continues progressions, one task per `(marker, step)`, told apart by the marker only, so
    /// adapters trained alone pull each other's step their own way.
    fn marked(n: usize, marker: u32, step: u32, seed: u64) -> Vec<Sequence> {
        use rand::Rng;
        let mut rng = crate::params::stream(seed, "marked");
        (0..n)
            .map(|_| {
                let s = rng.random_range(0..32u32);
                let ids: Vec<u32> = std::iter::once(marker)
                    .chain((0..11).map(|i| (s + i * step) % 32))
                    .collect();
                Sequence::prompt_completion(&ids[..2], &ids[2..])
            })
            .collect()
    }

    fn task_loss(model: &Llama, lora: &LoraSet, data: &[Sequence]) -> f64 {
        let refs: Vec<_> = data.iter().collect();
        let batch = Batch::new(&refs, 16, 0, DType::F32, &Device::Cpu).unwrap();
        let opts = ForwardOptions {
            lora: Some(lora),
            ..ForwardOptions::default()
        };
        let logits = model.forward(&batch.ids, opts).unwrap();
        let loss = masked_cross_entropy(&logits, &batch.targets, &batch.weights, batch.num_targets);
        scalar(&loss.unwrap()).unwrap()
    }

    /// Two fresh adapters of `model` (seeds 0 and 1, no dropout).
    fn two_adapters(model: &Llama) -> Vec<LoraSet> {
        (0..2)
            .map(|i| {
                let c = LoraConfig {
                    seed: i,
                    dropout: 0.0,
                    ..LoraConfig::default()
                };
                LoraSet::init(model.shape(), &c, DType::F32, &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// Two adapters on two tasks, trained alone or co-trained inside their merge: both learn
    /// their task, co-training reports the merged loss, and the `cat` merge of the co-trained
    /// pair does clearly better on both tasks than the merge of the pair trained alone.
    #[test]
    fn co_training_makes_the_merge_keep_both_tasks() {
        let init = InitConfig { seed: 3, std: 0.05 };
        let model = Llama::init(&tiny(), init, DType::F32, &Device::Cpu).unwrap();
        pretrain(&model, &progressions(256, 16, 1), &cfg(120)).unwrap();
        let data = [marked(128, 30, 1, 1), marked(128, 31, 3, 2)];
        let held = [marked(32, 30, 1, 3), marked(32, 31, 3, 4)];
        let run = |co: Option<&CoTrainConfig>| {
            let sets = two_adapters(&model);
            let jobs: Vec<LoraJob<'_>> = sets
                .iter()
                .zip(&data)
                .enumerate()
                .map(|(i, (lora, task))| LoraJob {
                    label: format!("task{i}"),
                    lora,
                    task,
                    anchors: None,
                    lr: None,
                })
                .collect();
            let reports: Vec<TrainReport> = train_loras(&model, &jobs, &cfg(80), co)
                .unwrap()
                .into_iter()
                .map(Option::unwrap)
                .collect();
            let merged = LoraSet::concat(&[(&sets[0], 1.0), (&sets[1], 1.0)]).unwrap();
            let alone: Vec<f64> = (0..2)
                .map(|i| task_loss(&model, &sets[i], &held[i]))
                .collect();
            let in_merge: Vec<f64> = (0..2)
                .map(|i| task_loss(&model, &merged, &held[i]))
                .collect();
            (reports, alone, in_merge)
        };
        let (solo_reports, solo_alone, solo_merge) = run(None);
        let co = CoTrainConfig { merged_weight: 1.0 };
        let (co_reports, co_alone, co_merge) = run(Some(&co));
        for r in solo_reports.iter().chain(&co_reports) {
            assert!(r.final_loss < 0.5 * r.first_loss, "{r:?}");
        }
        assert!(solo_reports.iter().all(|r| r.final_merged_loss.is_none()));
        assert!(co_reports.iter().all(|r| r.final_merged_loss.is_some()));
        for i in 0..2 {
            assert!(
                co_alone[i] < 0.1,
                "co-trained adapter {i} alone: {co_alone:?}"
            );
            assert!(
                co_merge[i] < 0.2 * solo_merge[i],
                "task {i} in the merge: co-trained {co_merge:?}, trained alone {solo_merge:?} \
                 (alone {solo_alone:?} / {co_alone:?})"
            );
        }
    }

    /// A job held fixed (learning rate 0) keeps its factors and reports nothing, while the
    /// other job co-trains inside the merge with it; a lone job at rate 0 is refused.
    #[test]
    fn a_job_held_fixed_takes_no_steps_but_stays_in_the_merge() {
        let init = InitConfig { seed: 3, std: 0.05 };
        let model = Llama::init(&tiny(), init, DType::F32, &Device::Cpu).unwrap();
        let data = [marked(64, 30, 1, 1), marked(64, 31, 3, 2)];
        let sets = two_adapters(&model);
        train_lora(&model, &sets[1], &data[1], None, &cfg(20)).unwrap();
        let flat = |set: &LoraSet| -> Vec<f32> {
            let snap = set.params().snapshot(DType::F32).unwrap();
            let mut names: Vec<_> = snap.keys().cloned().collect();
            names.sort();
            names
                .iter()
                .flat_map(|n| snap[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let before = flat(&sets[1]);
        let jobs: Vec<LoraJob<'_>> = (0..2)
            .map(|i| LoraJob {
                label: format!("task{i}"),
                lora: &sets[i],
                task: &data[i],
                anchors: None,
                lr: (i == 1).then_some(0.0),
            })
            .collect();
        let co = CoTrainConfig { merged_weight: 1.0 };
        let reports = train_loras(&model, &jobs, &cfg(10), Some(&co)).unwrap();
        assert!(reports[1].is_none());
        let trained = reports[0].as_ref().unwrap();
        let merged = trained.final_merged_loss.unwrap();
        assert!(merged != trained.final_loss, "{trained:?}");
        assert_eq!(flat(&sets[1]), before);
        let mut lone = cfg(5);
        lone.optim.lr = 0.0;
        let err = train_lora(&model, &sets[0], &data[0], None, &lone).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
    }
}
