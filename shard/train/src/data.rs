//! Training sequences, right-padded batches and a seeded batch order.

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::TrainError;
use crate::params::stream;

/// One token sequence and which of its tokens are predicted (contribute to the loss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `targets[i]`: token `i` is a loss target, predicted from tokens `..i` (`targets[0]` is
    /// ignored: nothing predicts the first token).
    pub targets: Vec<bool>,
}

impl Sequence {
    /// Every token after the first is a target (pretraining).
    pub fn all(tokens: Vec<u32>) -> Self {
        let targets = vec![true; tokens.len()];
        Self { tokens, targets }
    }

    /// A prompt followed by its completion: only the completion's tokens are targets.
    pub fn prompt_completion(prompt: &[u32], completion: &[u32]) -> Self {
        let mut tokens = prompt.to_vec();
        tokens.extend_from_slice(completion);
        let mut targets = vec![false; prompt.len()];
        targets.extend(std::iter::repeat_n(true, completion.len()));
        Self { tokens, targets }
    }

    /// Number of loss targets (after truncation to `max_len` tokens).
    pub fn num_targets(&self, max_len: usize) -> usize {
        self.targets
            .iter()
            .take(max_len)
            .skip(1)
            .filter(|t| **t)
            .count()
    }
}

/// Concatenates documents and cuts them into windows of `window + 1` tokens overlapping by one,
/// so each token after the first is predicted exactly once (pretraining packing: no padding).
pub fn pack(docs: &[Vec<u32>], window: usize) -> Vec<Sequence> {
    let stream: Vec<u32> = docs.iter().flatten().copied().collect();
    if window == 0 || stream.len() < 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < stream.len() {
        let end = (start + window + 1).min(stream.len());
        out.push(Sequence::all(stream[start..end].to_vec()));
        start += window;
    }
    out
}

/// A right-padded batch ready for the forward.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids `[batch, time]` (u32): every sequence but its last token, then padding.
    pub ids: Tensor,
    /// The next token of every input position, flattened `[batch * time]` (u32).
    pub targets: Tensor,
    /// 1 where the position's target counts in the loss, 0 elsewhere (padding, prompts),
    /// flattened `[batch * time]`.
    pub weights: Tensor,
    /// Positions with weight 1 (the useful tokens of the batch).
    pub num_targets: usize,
    /// Input positions that are not padding.
    pub num_tokens: usize,
    /// Input positions including padding (`batch * time`).
    pub num_positions: usize,
}

impl Batch {
    /// Builds a batch of `seqs`, each truncated to `max_len` tokens, padded with `pad`.
    pub fn new(
        seqs: &[&Sequence],
        max_len: usize,
        pad: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len().min(max_len)).collect();
        let t = lens.iter().copied().max().unwrap_or(0).saturating_sub(1);
        if t == 0 {
            return Err(TrainError::Data(
                "a batch needs a sequence of at least 2 tokens".into(),
            ));
        }
        let b = seqs.len();
        let (mut ids, mut targets, mut weights) =
            (vec![pad; b * t], vec![pad; b * t], vec![0f32; b * t]);
        let (mut num_targets, mut num_tokens) = (0, 0);
        for (row, (s, &len)) in seqs.iter().zip(&lens).enumerate() {
            if s.targets.len() != s.tokens.len() {
                return Err(TrainError::Data(
                    "targets and tokens differ in length".into(),
                ));
            }
            let n = len.saturating_sub(1);
            num_tokens += n;
            for i in 0..n {
                let at = row * t + i;
                ids[at] = s.tokens[i];
                targets[at] = s.tokens[i + 1];
                if s.targets[i + 1] {
                    weights[at] = 1.0;
                    num_targets += 1;
                }
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            targets: Tensor::from_vec(targets, b * t, device)?,
            weights: Tensor::from_vec(weights, b * t, device)?.to_dtype(dtype)?,
            num_targets,
            num_tokens,
            num_positions: b * t,
        })
    }
}

/// A seeded, endless order of batches over a data set: every epoch is a fresh permutation;
/// with length grouping, sequences of similar length are batched together (less padding) and
/// the batches are shuffled.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    lens: Vec<usize>,
    batch_size: usize,
    group_by_length: bool,
    rng: ChaCha8Rng,
    pending: Vec<Vec<usize>>,
}

impl BatchOrder {
    /// An order over sequences of these lengths.
    pub fn new(
        lens: Vec<usize>,
        batch_size: usize,
        group_by_length: bool,
        seed: u64,
    ) -> Result<Self, TrainError> {
        if lens.is_empty() || batch_size == 0 {
            return Err(TrainError::Data(
                "no sequences to train on (or batch size 0)".into(),
            ));
        }
        Ok(Self {
            lens,
            batch_size,
            group_by_length,
            rng: stream(seed, "batch-order"),
            pending: Vec::new(),
        })
    }

    /// Indices of the next batch (a full batch, wrapping into the next epoch when needed only
    /// at epoch boundaries: the last partial batch of an epoch is kept smaller).
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.pending.is_empty() {
            self.refill();
        }
        self.pending.pop().unwrap_or_default()
    }

    fn refill(&mut self) {
        let mut idx: Vec<usize> = (0..self.lens.len()).collect();
        idx.shuffle(&mut self.rng);
        if self.group_by_length {
            // Sort within pools of 32 batches: similar lengths together, still random overall.
            for pool in idx.chunks_mut(self.batch_size * 32) {
                pool.sort_by_key(|&i| self.lens[i]);
            }
        }
        let mut batches: Vec<Vec<usize>> =
            idx.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        batches.shuffle(&mut self.rng);
        self.pending = batches;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn batch_shifts_pads_and_masks() {
        let a = Sequence::prompt_completion(&[1, 2, 3], &[4, 5]);
        let b = Sequence::all(vec![7, 8, 9]);
        let batch = Batch::new(&[&a, &b], 100, 0, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 4], vec![7, 8, 0, 0]]
        );
        assert_eq!(
            batch.targets.to_vec1::<u32>().unwrap(),
            vec![2, 3, 4, 5, 8, 9, 0, 0]
        );
        assert_eq!(
            batch.weights.to_vec1::<f32>().unwrap(),
            vec![0., 0., 1., 1., 1., 1., 0., 0.]
        );
        assert_eq!(
            (batch.num_targets, batch.num_tokens, batch.num_positions),
            (4, 6, 8)
        );
    }

    #[test]
    fn packing_predicts_every_token_once() {
        let seqs = pack(&[vec![1, 2, 3], vec![4, 5, 6, 7]], 3);
        let toks: Vec<Vec<u32>> = seqs.iter().map(|s| s.tokens.clone()).collect();
        assert_eq!(toks, vec![vec![1, 2, 3, 4], vec![4, 5, 6, 7]]);
    }

    #[test]
    fn order_is_seeded_and_covers_each_epoch() {
        let lens: Vec<usize> = (0..10).collect();
        let mut a = BatchOrder::new(lens.clone(), 3, true, 5).unwrap();
        let mut b = BatchOrder::new(lens, 3, true, 5).unwrap();
        let mut seen: Vec<usize> = (0..4).flat_map(|_| a.next_batch()).collect();
        let again: Vec<usize> = (0..4).flat_map(|_| b.next_batch()).collect();
        assert_eq!(seen, again);
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
