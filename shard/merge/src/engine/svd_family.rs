//! The SVD family (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`):
//! PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`.
//!
//! Per module, over the components that have it: the full deltas `D_i = s_i B_i A_i` (f32, as
//! PEFT's `get_delta_weight`) are combined with the raw weights `w_i` (PEFT passes the weights
//! unscaled here; the adapter scale enters once, through `D_i`), then factorized by a rank-`R`
//! truncated SVD: `B = U_R diag(S_R)`, `A = V_R^T`, scale 1.
//!
//! Algorithms:
//! * no pruning and a plain weighted sum (`svd`, or a pruning variant at density >= 1): the delta
//!   is `Bc @ Ac` with `Bc = [w_i s_i B_i]`, `Ac = [A_i]` stacked, so the truncated SVD is exact
//!   and cheap (Gram eigendecompositions of both factors + SVD of the `K x K` core, f64), without
//!   forming `D`;
//! * otherwise `D` is built block by block (deltas recomputed per block, never stored per
//!   component; magnitude thresholds by a sampled bracket + one gathering pass over regenerated
//!   blocks, radix select as fallback) and factorized exactly (Jacobi, f64) when
//!   `min(out, in) <= EXACT_DENSE_MAX_DIM`, else by randomized block Krylov iteration (see
//!   `linalg::svd::truncated_randomized` for parameters and accuracy).
//!
//! Modules are processed one at a time, largest first (the dense delta of one module is the
//! largest buffer), with thresholds, the delta build and the matrix products parallelized
//! inside.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::select::{Bracket, KeepRule, RadixSelect, RangeSelect, keep_count};
use super::side::{Combine, Prune, Pruner, Scratch};
use super::{MergeError, Present, check_finite, prune_and_combine};
use crate::MergeSpec;
use crate::adapter::{LoraAdapter, MergedModule};
use crate::linalg::svd::{
    KrylovSvd, truncated_dense_exact, truncated_from_factors, truncated_randomized,
};
use crate::linalg::{MatMut, MatRef, gemm};
use crate::matrix::Matrix;
use crate::rng::{StreamSide, keyed_stream};
use crate::{Combination, Strategy};

/// Largest `min(out, in)` factorized by the exact dense Jacobi SVD.
pub(crate) const EXACT_DENSE_MAX_DIM: usize = 128;

/// Target number of elements of one generated block of a delta.
const BLOCK_ELEMS: usize = 1 << 16;

/// Settings shared by every module of one merge.
struct SvdPlan<'s> {
    prune: Prune,
    combine: Combine,
    rank: usize,
    spec: &'s MergeSpec,
    threads: usize,
    /// Row chunks the dense delta is built in (concurrently).
    chunks: usize,
}

/// Merges every module of the plan (sequentially; products use the rayon pool).
pub(crate) fn merge_modules(
    spec: &MergeSpec,
    strategy: Strategy,
    components: &[&LoraAdapter],
    plan: &BTreeMap<String, Vec<Present<'_>>>,
) -> Result<BTreeMap<String, MergedModule>, MergeError> {
    let max_rank = components
        .iter()
        .flat_map(|c| c.modules().values().map(|m| m.rank()))
        .max()
        .unwrap_or(1);
    let combination = strategy.combination().unwrap_or(Combination::Linear);
    let (prune, combine) = prune_and_combine(combination, spec.density, spec);
    let svd = SvdPlan {
        prune,
        combine,
        rank: spec.svd_rank.unwrap_or(max_rank),
        spec,
        threads: rayon::current_num_threads(),
        chunks: 2 * rayon::current_num_threads(),
    };
    // Largest modules first: the dense delta of the module in progress is the largest buffer,
    // and doing the big ones while few outputs exist keeps peak memory low.
    let mut order: Vec<(&String, &Vec<Present<'_>>)> = plan.iter().collect();
    order.sort_by_key(|(_, p)| {
        std::cmp::Reverse(p[0].module.out_features() * p[0].module.in_features())
    });
    let mut out = BTreeMap::new();
    // One dense-delta buffer for all modules (the first, largest module sizes it).
    let mut d = Vec::new();
    for (name, present) in order {
        check_finite(name, present)?;
        out.insert(name.clone(), svd.merge_module(name, present, &mut d));
    }
    Ok(out)
}

impl SvdPlan<'_> {
    fn merge_module(&self, name: &str, present: &[Present<'_>], d: &mut Vec<f32>) -> MergedModule {
        let first = present[0].module;
        let (m, n) = (first.out_features(), first.in_features());
        let rank = self.rank.min(m).min(n);
        let (mut b, mut a) = if self.prune == Prune::Keep && self.combine == Combine::Sum {
            self.low_rank(present, m, n, rank)
        } else {
            self.dense_delta(name, present, m, n, d);
            let d = &d[..m * n];
            if m.min(n) <= EXACT_DENSE_MAX_DIM {
                truncated_dense_exact(d, m, n, rank)
            } else {
                let mut sketch = keyed_stream(self.spec.seed, name, StreamSide::SvdSketch, 0);
                let params = KrylovSvd::default();
                truncated_randomized(d, m, n, rank, params, &mut sketch, self.threads)
            }
        };
        if let Some(q) = self.spec.svd_clamp {
            clamp_factors(&mut b, &mut a, q);
        }
        MergedModule { a, b }
    }

    /// Exact truncated SVD of `sum_i w_i s_i B_i A_i` from the stacked factors.
    fn low_rank(
        &self,
        present: &[Present<'_>],
        m: usize,
        n: usize,
        rank: usize,
    ) -> (Matrix, Matrix) {
        let k: usize = present.iter().map(|p| p.module.rank()).sum();
        let mut bc = Vec::with_capacity(m * k);
        let mut ac = Vec::with_capacity(n * k);
        for p in present {
            let r = p.module.rank();
            // PEFT: weights are an f32 tensor and the scale an f32 scalar.
            let c = f64::from(self.spec.weights[p.index]) * f64::from(p.module.scale() as f32);
            let bd = p.module.b().data();
            for col in 0..r {
                bc.extend((0..m).map(|row| c * f64::from(bd[row * r + col])));
            }
            ac.extend(p.module.a().data().iter().map(|&x| f64::from(x)));
        }
        truncated_from_factors(bc, ac, m, n, k, rank)
    }

    /// Builds the combined dense delta (row-major `m x n`) in the first `m * n` values of `d`.
    /// The buffer is reused across modules; it is replaced when it is more than twice the size
    /// needed, so the largest-first order releases memory as modules get smaller.
    ///
    /// Parallel: the magnitude thresholds of the components are computed concurrently, and the
    /// delta is built in row chunks concurrently (DARE streams seek to each chunk's first element;
    /// the rare magnitude rule that must keep only some of several tied elements forces a
    /// sequential build, since it depends on flat order).
    fn dense_delta(
        &self,
        name: &str,
        present: &[Present<'_>],
        m: usize,
        n: usize,
        d: &mut Vec<f32>,
    ) {
        let rows_per_block = (BLOCK_ELEMS / n).clamp(1, m);
        let block_elems = rows_per_block * n;
        let blocks = DeltaBlocks {
            m,
            n,
            rows_per_block,
            threads: 1,
        };
        let rules: Vec<KeepRule> = match self.prune {
            Prune::Magnitude { density } => present
                .par_iter()
                .map(|p| {
                    let mut tmp = vec![0.0f32; block_elems];
                    blocks.select(p, keep_count(density, m * n), &mut tmp)
                })
                .collect(),
            _ => Vec::new(),
        };
        let weights: Vec<f32> = present.iter().map(|p| self.spec.weights[p.index]).collect();
        if d.len() < m * n || d.len() > 2 * m * n {
            *d = Vec::new();
            d.resize(m * n, 0.0);
        }
        let pruners_from = |row: usize| -> Vec<Pruner> {
            present
                .iter()
                .enumerate()
                .map(|(i, p)| match self.prune {
                    Prune::Keep => Pruner::Keep,
                    Prune::Magnitude { .. } => {
                        rules.get(i).map_or(Pruner::Keep, |&r| Pruner::magnitude(r))
                    }
                    Prune::Random { density, rescale } => {
                        let mut stream =
                            keyed_stream(self.spec.seed, name, StreamSide::Delta, p.index as u64);
                        // One 32-bit word per element: seek to the chunk's first element.
                        stream.set_word_pos((row * n) as u128);
                        Pruner::random(density, rescale, stream)
                    }
                })
                .collect()
        };
        let ordered = rules.iter().any(KeepRule::depends_on_order);
        let chunk_rows = if ordered {
            m
        } else {
            rows_per_block
                * m.div_ceil(rows_per_block)
                    .div_ceil(self.chunks.max(1))
                    .max(1)
        };
        d[..m * n]
            .par_chunks_mut(chunk_rows * n)
            .enumerate()
            .for_each(|(c, region)| {
                let first_row = c * chunk_rows;
                let mut pruners = pruners_from(first_row);
                let mut tmp = vec![0.0f32; block_elems];
                let mut scratch = Scratch::new(present.len(), block_elems);
                for (b, out) in region.chunks_mut(block_elems).enumerate() {
                    let r0 = first_row + b * rows_per_block;
                    for (i, (p, pruner)) in present.iter().zip(pruners.iter_mut()).enumerate() {
                        let t = blocks.delta(p, r0, &mut tmp);
                        pruner.apply(t, scratch.slot(i, t.len()));
                    }
                    scratch.combine(self.combine, &weights, out);
                }
            });
    }
}

/// Generates row blocks of `D_i = f32(B_i @ A_i) * f32(s_i)`.
struct DeltaBlocks {
    m: usize,
    n: usize,
    rows_per_block: usize,
    threads: usize,
}

impl DeltaBlocks {
    /// Rows `r0..` (one block) of the delta of `p`, written to the front of `buf`.
    fn delta<'b>(&self, p: &Present<'_>, r0: usize, buf: &'b mut [f32]) -> &'b [f32] {
        let rows = self.rows_per_block.min(self.m - r0);
        let r = p.module.rank();
        let out = &mut buf[..rows * self.n];
        let b_rows = &p.module.b().data()[r0 * r..(r0 + rows) * r];
        gemm(
            MatRef::row_major(b_rows, rows, r),
            MatRef::row_major(p.module.a().data(), r, self.n),
            MatMut::row_major(out, rows, self.n),
            false,
            self.threads,
        );
        let s = p.module.scale() as f32;
        out.iter_mut().for_each(|x| *x *= s);
        out
    }

    /// The magnitude keep rule of the delta of `p`: a sample of the delta brackets the
    /// threshold and one pass over regenerated blocks gathers the bracket; if the bracket misses,
    /// an exact radix select over regenerated blocks (at most three passes).
    fn select(&self, p: &Present<'_>, k: usize, buf: &mut [f32]) -> KeepRule {
        let mut radix = match RadixSelect::new(k, self.m * self.n) {
            Ok(sel) => sel,
            Err(rule) => return rule,
        };
        let mut sample = self.sample(p, 4096);
        let mut range = RangeSelect::new(Bracket::from_sample(&mut sample, k, self.m * self.n));
        for r0 in (0..self.m).step_by(self.rows_per_block) {
            range.feed(self.delta(p, r0, buf));
        }
        if let Some(rule) = range.finish(k) {
            return rule;
        }
        loop {
            for r0 in (0..self.m).step_by(self.rows_per_block) {
                radix.feed(self.delta(p, r0, buf));
            }
            if let Some(rule) = radix.finish_pass() {
                return rule;
            }
        }
    }

    /// Magnitude bits of `n` delta entries at evenly spaced flat positions (computed directly;
    /// only used to bracket the threshold, so summation order does not matter).
    fn sample(&self, p: &Present<'_>, n: usize) -> Vec<u32> {
        let total = self.m * self.n;
        let n = n.min(total);
        let stride = total / n.max(1);
        let r = p.module.rank();
        let (a, b) = (p.module.a().data(), p.module.b().data());
        let s = p.module.scale() as f32;
        (0..n)
            .map(|t| {
                let (i, j) = ((t * stride) / self.n, (t * stride) % self.n);
                let v: f32 = (0..r).map(|q| b[i * r + q] * a[q * self.n + j]).sum();
                (v * s).to_bits() & 0x7fff_ffff
            })
            .collect()
    }
}

/// PEFT's `svd_clamp`: clamp both factors to `[-h, h]` with `h` the `q`-quantile (linear
/// interpolation, as `torch.quantile`) of their concatenated entries. Like `torch.clamp`, a
/// negative `h` (min > max) sets everything to `h`.
fn clamp_factors(b: &mut Matrix, a: &mut Matrix, q: f32) {
    let mut dist: Vec<f32> = b.data().iter().chain(a.data()).copied().collect();
    if dist.is_empty() {
        return;
    }
    dist.sort_by(f32::total_cmp);
    let hi = quantile_sorted(&dist, q);
    let lo = -hi;
    for v in b.data_mut().iter_mut().chain(a.data_mut().iter_mut()) {
        *v = v.max(lo).min(hi);
    }
}

/// Linear-interpolation quantile of sorted, non-empty values.
fn quantile_sorted(sorted: &[f32], q: f32) -> f32 {
    let pos = f64::from(q) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = (pos - lo as f64) as f32;
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::SignMethod;
    use crate::adapter::{LoraAdapter, LoraModule};

    fn component(seed: u32, m: usize, n: usize, r: usize) -> LoraModule {
        let f = |i: usize, k: f32| ((i as f32 + 1.0) * k + seed as f32).sin();
        let a = Matrix::new(r, n, (0..r * n).map(|i| f(i, 0.37)).collect()).unwrap();
        let b = Matrix::new(m, r, (0..m * r).map(|i| f(i, 0.11) * 0.1).collect()).unwrap();
        LoraModule::new("x", a, b, 0.5).unwrap()
    }

    #[test]
    fn chunked_dense_build_matches_sequential() {
        // 5000 x 64 gives 1024-row blocks, so several blocks and chunks; DARE streams must seek.
        let (m, n, r) = (5000, 64, 4);
        let mods: Vec<LoraModule> = (0..3).map(|s| component(s, m, n, r)).collect();
        let adapters: Vec<LoraAdapter> = mods
            .iter()
            .map(|x| LoraAdapter::new(r, 0.5, [("x".to_string(), x.clone())].into_iter().collect()))
            .collect();
        let present: Vec<Present<'_>> = adapters
            .iter()
            .enumerate()
            .map(|(index, a)| Present {
                index,
                module: &a.modules()["x"],
            })
            .collect();
        for strategy in [
            Strategy::DareTiesSvd,
            Strategy::DareLinearSvd,
            Strategy::TiesSvd,
        ] {
            let spec = MergeSpec::new(strategy, vec![1.0, -0.7, 0.4])
                .with_density(0.3)
                .with_seed(11)
                .with_sign_method(SignMethod::Frequency);
            let combination = strategy.combination().unwrap();
            let (prune, combine) = prune_and_combine(combination, spec.density, &spec);
            let plan = |chunks| SvdPlan {
                prune,
                combine,
                rank: 4,
                spec: &spec,
                threads: 2,
                chunks,
            };
            let (mut one, mut many) = (Vec::new(), Vec::new());
            plan(1).dense_delta("x", &present, m, n, &mut one);
            plan(3).dense_delta("x", &present, m, n, &mut many);
            assert_eq!(one, many, "{strategy}");
            assert!(one.iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert!((quantile_sorted(&v, 0.5) - 2.5).abs() < 1e-7);
        assert!((quantile_sorted(&v, 0.9) - 3.7).abs() < 1e-6);
    }

    #[test]
    fn clamp_bounds_both_factors() {
        let mut b = Matrix::new(2, 2, vec![5.0, -7.0, 0.5, 1.0]).unwrap();
        let mut a = Matrix::new(2, 2, vec![0.1, -0.2, 9.0, 0.3]).unwrap();
        clamp_factors(&mut b, &mut a, 0.75);
        let h = quantile_sorted(&[-7.0, -0.2, 0.1, 0.3, 0.5, 1.0, 5.0, 9.0], 0.75);
        assert!(b.data().iter().chain(a.data()).all(|v| v.abs() <= h));
        assert_eq!(b.data()[1], -h);
    }
}
