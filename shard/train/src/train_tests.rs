//! Tests of [`super`]: pretraining, LoRA training and merge-aware co-training on tiny models.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::lora::LoraConfig;
use crate::model::InitConfig;
use candle_core::{DType, Device};
use medley_shard::model::{LlamaDims, ModelConfig};

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

pub(crate) fn tiny() -> ModelConfig {
    ModelConfig::llama(LlamaDims {
        vocab_size: 32,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
    })
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
