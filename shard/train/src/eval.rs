//! A quick in-process check of what the adapters learned: batched greedy decoding with the
//! training forward (no KV cache: each new token re-runs the whole prefix, fine for the short
//! demo examples), scored by exact match like `medley eval`'s `exact` rule.

use candle_core::{IndexOp, Tensor};

use crate::TrainError;
use crate::lora::LoraSet;
use crate::model::{ForwardOptions, Llama};

/// Greedy continuation of every prompt: up to `max_new` tokens each, stopping after `eos` (not
/// included in the output), `batch` prompts per forward.
pub fn greedy(
    model: &Llama,
    lora: Option<&LoraSet>,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: u32,
    batch: usize,
) -> Result<Vec<Vec<u32>>, TrainError> {
    let model = model.frozen();
    let device = model.params().device().clone();
    let mut outputs = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let mut seqs: Vec<Vec<u32>> = chunk.to_vec();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut done: Vec<bool> = seqs.iter().map(Vec::is_empty).collect();
        for _ in 0..max_new {
            if done.iter().all(|d| *d) {
                break;
            }
            let t = seqs.iter().map(Vec::len).max().unwrap_or(1);
            let ids: Vec<u32> = seqs
                .iter()
                .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
                .collect();
            let ids = Tensor::from_vec(ids, (seqs.len(), t), &device)?;
            let logits = model.forward(
                &ids,
                ForwardOptions {
                    lora,
                    dropout: None,
                    frozen: None,
                },
            )?;
            for (row, s) in seqs.iter_mut().enumerate() {
                if done[row] {
                    continue;
                }
                let next = logits
                    .i((row, s.len() - 1))?
                    .argmax(0)?
                    .to_scalar::<u32>()?;
                if next == eos {
                    done[row] = true;
                } else {
                    s.push(next);
                    out[row].push(next);
                }
            }
        }
        outputs.extend(out);
    }
    Ok(outputs)
}

/// The fraction of `outputs` equal to `expected` once both are trimmed.
pub fn exact_match(outputs: &[String], expected: &[String]) -> f64 {
    if expected.is_empty() {
        return 0.0;
    }
    let hits = outputs
        .iter()
        .zip(expected)
        .filter(|(o, e)| o.trim() == e.trim())
        .count();
    hits as f64 / expected.len() as f64
}
