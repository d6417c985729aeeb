//! Training throughput of a model shape, batch size and sequence length on this machine (random
//! tokens, full pretraining steps: forward, backward, AdamW), to pick the fastest configuration.

use candle_core::{DType, Device};
use rand::Rng;
use serde::Serialize;

use crate::TrainError;
use crate::data::Sequence;
use crate::model::{InitConfig, Llama};
use crate::params::stream;
use crate::train::{TrainConfig, pretrain};
use medley_shard::model::ModelConfig;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Parameters of the model.
    pub params: usize,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Seconds per optimiser step.
    pub step_s: f64,
    /// Trained tokens per second.
    pub tokens_per_s: f64,
}

/// Runs `steps` pretraining steps (after one warm-up step) of `shape` on random tokens.
pub fn measure(
    shape: &ModelConfig,
    batch_size: usize,
    seq_len: usize,
    steps: usize,
) -> Result<Throughput, TrainError> {
    let model = Llama::init(shape, InitConfig::default(), DType::F32, &Device::Cpu)?;
    let mut rng = stream(0, "measure");
    let data: Vec<Sequence> = (0..batch_size)
        .map(|_| {
            Sequence::all(
                (0..=seq_len)
                    .map(|_| rng.random_range(0..shape.vocab_size as u32))
                    .collect(),
            )
        })
        .collect();
    let cfg = |steps| TrainConfig {
        steps,
        batch_size,
        max_len: seq_len + 1,
        warmup_steps: 1,
        log_every: usize::MAX,
        ..TrainConfig::default()
    };
    pretrain(&model, &data, &cfg(1))?;
    let report = pretrain(&model, &data, &cfg(steps))?;
    Ok(Throughput {
        params: shape.param_count(),
        batch_size,
        seq_len,
        step_s: report.seconds / steps as f64,
        tokens_per_s: report.tokens_per_s(),
    })
}
