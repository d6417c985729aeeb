//! Merging n same-shaped tensors into one (PEFT's `merge_utils` primitives), fused and streamed:
//! each component's values are pruned block by block into a small buffer and the blocks are
//! combined immediately, so no full-size intermediate tensor is ever allocated.

use rand_chacha::ChaCha8Rng;

use super::select::{KeepRule, MagnitudeMask, keep_count, select_slice};
use crate::SignMethod;
use crate::rng::Bernoulli;

/// Elements per block of the fused loops (fits L1 for a handful of components).
pub(crate) const BLOCK: usize = 1024;

/// How each component tensor is pruned before combining.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Prune {
    /// No pruning.
    Keep,
    /// Keep the `floor(density * len)` largest magnitudes (`density < 1`).
    Magnitude { density: f64 },
    /// Keep each value with probability `density` (`density < 1`); divide kept values by
    /// `rescale` when set (PEFT >= 0.19's `1/d`; LoRAX does not rescale).
    Random { density: f64, rescale: Option<f32> },
}

/// How the pruned tensors are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Combine {
    /// `sum_i w_i T'_i`.
    Sum,
    /// Elect a sign on the unweighted `T'`, then `sum_{agree} w_i T'_i / max(1, #agree)`.
    Ties(SignMethod),
}

/// The per-component pruning state, applied in flat order.
pub(crate) enum Pruner {
    /// Copy.
    Keep,
    /// Magnitude mask.
    Magnitude(MagnitudeMask),
    /// Bernoulli mask with optional rescale divisor (boxed: the stream state is large).
    Random {
        draws: Box<Bernoulli>,
        rescale: Option<f32>,
    },
}

impl Pruner {
    /// A pruner for a whole tensor `values` (computes the magnitude threshold if needed);
    /// `stream` is only called for random pruning.
    pub(crate) fn for_slice(
        prune: Prune,
        values: &[f32],
        stream: impl FnOnce() -> ChaCha8Rng,
    ) -> Self {
        match prune {
            Prune::Keep => Pruner::Keep,
            Prune::Magnitude { density } => {
                let rule = select_slice(values, keep_count(density, values.len()));
                Pruner::Magnitude(MagnitudeMask::new(rule))
            }
            Prune::Random { density, rescale } => Pruner::random(density, rescale, stream()),
        }
    }

    /// A magnitude pruner with a precomputed rule.
    pub(crate) fn magnitude(rule: KeepRule) -> Self {
        Pruner::Magnitude(MagnitudeMask::new(rule))
    }

    /// A Bernoulli pruner.
    pub(crate) fn random(density: f64, rescale: Option<f32>, stream: ChaCha8Rng) -> Self {
        Pruner::Random {
            draws: Box::new(Bernoulli::new(stream, density)),
            rescale,
        }
    }

    /// Writes the pruned values of the next chunk `src` into `dst`.
    pub(crate) fn apply(&mut self, src: &[f32], dst: &mut [f32]) {
        match self {
            Pruner::Keep => dst.copy_from_slice(src),
            Pruner::Magnitude(mask) => mask.apply(src, dst),
            Pruner::Random { draws, rescale } => draws.apply(src, dst, *rescale),
        }
    }
}

/// Scratch for the fused loops: one pruned block per component plus election accumulators.
pub(crate) struct Scratch {
    pruned: Vec<f32>,
    block: usize,
    acc: Accumulators,
}

/// Per-element accumulators of the sign election.
pub(crate) struct Accumulators {
    sigma: Vec<f32>,
    count: Vec<f32>,
}

impl Scratch {
    /// Scratch for `n` components and blocks of up to `block` elements.
    pub(crate) fn new(n: usize, block: usize) -> Self {
        Self {
            pruned: vec![0.0; n * block],
            block,
            acc: Accumulators {
                sigma: vec![0.0; block],
                count: vec![0.0; block],
            },
        }
    }

    /// The pruned-values buffer of component `i` for a block of `len` elements.
    pub(crate) fn slot(&mut self, i: usize, len: usize) -> &mut [f32] {
        &mut self.pruned[i * self.block..i * self.block + len]
    }

    /// Combines the pruned blocks of components `0..weights.len()` (`out.len()` elements each).
    pub(crate) fn combine(&mut self, combine: Combine, weights: &[f32], out: &mut [f32]) {
        let (block, len) = (self.block, out.len());
        let pruned = &self.pruned;
        combine_block(
            combine,
            weights,
            |i| &pruned[i * block..i * block + len],
            &mut self.acc,
            out,
        );
    }
}

/// Combines component blocks `comp(i)` (each `out.len()` long) into `out`, in f32, with the
/// operation order of PEFT's `merge_utils`.
pub(crate) fn combine_block<'c>(
    combine: Combine,
    weights: &[f32],
    comp: impl Fn(usize) -> &'c [f32],
    acc: &mut Accumulators,
    out: &mut [f32],
) {
    let len = out.len();
    match combine {
        Combine::Sum => {
            out.fill(0.0);
            for (i, &w) in weights.iter().enumerate() {
                for (o, &p) in out.iter_mut().zip(comp(i)) {
                    *o += p * w;
                }
            }
        }
        Combine::Ties(method) => {
            let sigma = &mut acc.sigma[..len];
            let count = &mut acc.count[..len];
            sigma.fill(0.0);
            for i in 0..weights.len() {
                match method {
                    SignMethod::Total => {
                        for (s, &p) in sigma.iter_mut().zip(comp(i)) {
                            *s += p;
                        }
                    }
                    SignMethod::Frequency => {
                        for (s, &p) in sigma.iter_mut().zip(comp(i)) {
                            *s += sign(p);
                        }
                    }
                }
            }
            out.fill(0.0);
            count.fill(0.0);
            for (i, &w) in weights.iter().enumerate() {
                for ((o, c), (&p, &s)) in out
                    .iter_mut()
                    .zip(count.iter_mut())
                    .zip(comp(i).iter().zip(sigma.iter()))
                {
                    // Majority sign is +1 where sigma >= 0 (ties and all-zero elect +), else -1;
                    // a pruned zero has sign 0 and never agrees.
                    let agree = if s >= 0.0 { p > 0.0 } else { p < 0.0 };
                    let m = if agree { 1.0 } else { 0.0 };
                    *o += (p * w) * m;
                    *c += m;
                }
            }
            for (o, &c) in out.iter_mut().zip(count.iter()) {
                *o /= c.max(1.0);
            }
        }
    }
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Merges whole tensors: `inputs[i]` (all the same length) with `weights[i]`, pruned by
/// `prune` (the stream for component `i` is `stream(i)`) and combined by `combine`.
pub(crate) fn merge_slices(
    prune: Prune,
    combine: Combine,
    inputs: &[&[f32]],
    weights: &[f32],
    stream: impl Fn(usize) -> ChaCha8Rng,
) -> Vec<f32> {
    let len = inputs.first().map_or(0, |x| x.len());
    let mut out = vec![0.0f32; len];
    let block = BLOCK.min(len.max(1));
    if prune == Prune::Keep {
        // Nothing to prune: combine straight from the inputs.
        let mut acc = Accumulators {
            sigma: vec![0.0; block],
            count: vec![0.0; block],
        };
        for (start, o) in (0..len).step_by(block).zip(out.chunks_mut(block)) {
            let end = start + o.len();
            combine_block(combine, weights, |i| &inputs[i][start..end], &mut acc, o);
        }
        return out;
    }
    let mut pruners: Vec<Pruner> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| Pruner::for_slice(prune, x, || stream(i)))
        .collect();
    let mut scratch = Scratch::new(inputs.len(), block);
    for (start, o) in (0..len).step_by(block).zip(out.chunks_mut(block)) {
        let end = start + o.len();
        for (i, (pruner, x)) in pruners.iter_mut().zip(inputs).enumerate() {
            pruner.apply(&x[start..end], scratch.slot(i, end - start));
        }
        scratch.combine(combine, weights, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{StreamSide, keyed_stream};

    const A1: [f32; 6] = [0.9, -0.1, 0.4, -0.5, 0.2, 0.05];
    const A2: [f32; 6] = [-0.3, 0.6, -0.2, 0.1, -0.7, 0.25];
    const A3: [f32; 6] = [0.2, -0.8, 0.15, -0.35, 0.45, -0.6];

    fn stream(i: usize) -> ChaCha8Rng {
        keyed_stream(0, "t", StreamSide::A, i as u64)
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn section_four_ties_and_linear_raw_weights() {
        // merge-semantics.md §4 (LoRAX per-side with raw weights [2.0, 0.3, 0.7], d = 0.5).
        // Tolerance 1e-6: the vectors are given to about 7 significant digits.
        let inputs: [&[f32]; 3] = [&A1, &A2, &A3];
        let w = [2.0f32, 0.3, 0.7];
        let mag = Prune::Magnitude { density: 0.5 };
        let total = merge_slices(mag, Combine::Ties(SignMethod::Total), &inputs, &w, stream);
        close(&total, &[1.8, -0.56, 0.8, -1.0, -0.21, -0.42], 1e-6);
        let freq = merge_slices(
            mag,
            Combine::Ties(SignMethod::Frequency),
            &inputs,
            &w,
            stream,
        );
        close(&freq, &[1.8, 0.18, 0.8, -1.0, 0.315, -0.42], 1e-6);
        let lin = merge_slices(Prune::Keep, Combine::Sum, &inputs, &w, stream);
        close(&lin, &[1.85, -0.58, 0.845, -1.215, 0.505, -0.245], 1e-6);
        // PEFT's A side with s = 2: weights sgn(c) sqrt|c|, c = w s.
        let pw: Vec<f32> = w
            .iter()
            .map(|&x| (f64::from(x) * 2.0).sqrt() as f32)
            .collect();
        let peft = merge_slices(mag, Combine::Ties(SignMethod::Total), &inputs, &pw, stream);
        close(
            &peft,
            &[1.8, -0.946573, 0.8, -1.0, -0.542218, -0.70993],
            2e-6,
        );
    }

    #[test]
    fn random_pruning_extremes() {
        let inputs: [&[f32]; 3] = [&A1, &A2, &A3];
        let w = [1.0f32, 1.0, 1.0];
        let none = Prune::Random {
            density: 0.0,
            rescale: Some(0.0),
        };
        assert!(
            merge_slices(none, Combine::Sum, &inputs, &w, stream)
                .iter()
                .all(|&x| x == 0.0)
        );
    }
}
