//! The merge engine: pure functions from component adapters and a [`MergeSpec`] to a
//! [`MergedAdapter`]. No I/O.
//!
//! Semantics (see `docs/merge-semantics.md`):
//! * **PEFT** (default) reproduces PEFT >= 0.19 `add_weighted_adapter`. Per module, over the
//!   components that have it, with `c_i = w_i * s_i`: the factor strategies merge `A` with
//!   weights `sgn(c_i) sqrt|c_i|` and `B` with `sqrt|c_i|`; DARE rescales kept values by `1/d`;
//!   `cat` stacks `w_i s_i A_i` and `B_i`; the SVD family merges the full deltas `s_i B_i A_i`
//!   with weights `w_i` and factorizes by truncated SVD. The merged scale is 1. Weights and
//!   density arrive as `f32` and are widened through their shortest decimal form (so `0.7f32`
//!   acts as Python's `0.7`), then follow PEFT's f64-scalar / f32-tensor arithmetic.
//! * **LoRAX** merges `A` and `B` separately with the raw weights, never rescales DARE, computes
//!   `k` from the f32 density, checks only that the config ranks are equal, and returns adapter
//!   0's config scale as the merged scale.
//!
//! Randomness (DARE) comes from streams keyed by (seed, module, side, component index), so the
//! result never depends on thread scheduling. Modules are merged in parallel with rayon.

mod cat;
mod error;
mod select;
mod side;
mod svd_family;

use std::collections::BTreeMap;

use rayon::prelude::*;

pub use error::MergeError;

use crate::MergeSpec;
use crate::adapter::{LoraAdapter, LoraModule, MergedAdapter, MergedModule};
use crate::matrix::Matrix;
use crate::rng::{StreamSide, keyed_stream};
use crate::{Combination, Semantics, Strategy};
use side::{Combine, Prune, merge_slices};

/// A component that has a given module.
#[derive(Clone, Copy)]
pub(crate) struct Present<'a> {
    /// Index of the component in the merge.
    pub index: usize,
    /// Its factors for the module.
    pub module: &'a LoraModule,
}

/// Merges `components` (one weight each in `spec.weights`) as described by `spec`.
pub fn merge(spec: &MergeSpec, components: &[&LoraAdapter]) -> Result<MergedAdapter, MergeError> {
    validate_spec(spec, components.len())?;
    let plan = plan_modules(components)?;
    if components.len() == 1 && spec.semantics == Semantics::Lorax {
        // LoRAX loads a one-element merge as the plain adapter; its weight is ignored.
        let only = components[0];
        let modules = plan
            .iter()
            .map(|(name, present)| {
                check_finite(name, present)?;
                let m = present[0].module;
                Ok((
                    name.clone(),
                    MergedModule {
                        a: m.a().clone(),
                        b: m.b().clone(),
                    },
                ))
            })
            .collect::<Result<BTreeMap<_, _>, MergeError>>()?;
        return Ok(MergedAdapter {
            scale: only.config_scale(),
            modules,
        });
    }
    // PEFT forces `linear` for a single adapter.
    let strategy = if components.len() == 1 {
        Strategy::Linear
    } else {
        spec.strategy
    };
    check_ranks(spec, strategy, components, &plan)?;
    let scale = match spec.semantics {
        Semantics::Peft => 1.0,
        Semantics::Lorax => components[0].config_scale(),
    };
    let modules = if strategy == Strategy::Cat {
        par_modules(&plan, |_, present| {
            Ok(cat::merge_module(present, &spec.weights))
        })?
    } else if strategy.is_svd() {
        svd_family::merge_modules(spec, strategy, components, &plan)?
    } else {
        let factor = FactorPlan::new(spec, strategy);
        par_modules(&plan, |name, present| {
            Ok(factor.merge_module(name, present, &spec.weights))
        })?
    };
    Ok(MergedAdapter { scale, modules })
}

/// Checks everything about the spec that does not depend on the tensors.
fn validate_spec(spec: &MergeSpec, components: usize) -> Result<(), MergeError> {
    if components == 0 {
        return Err(MergeError::NoComponents);
    }
    if spec.weights.len() != components {
        return Err(MergeError::WeightCount {
            weights: spec.weights.len(),
            components,
        });
    }
    if let Some((index, &value)) = spec
        .weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite())
    {
        return Err(MergeError::NonFiniteWeight { index, value });
    }
    // One component is a plain (linear) adapter in both semantics: the strategy is ignored.
    let strategy = if components == 1 {
        Strategy::Linear
    } else {
        spec.strategy
    };
    if spec.semantics == Semantics::Lorax
        && !matches!(
            strategy,
            Strategy::Linear | Strategy::Ties | Strategy::DareLinear | Strategy::DareTies
        )
    {
        return Err(MergeError::NotInLorax { strategy });
    }
    if strategy.uses_density() {
        match spec.density {
            None => return Err(MergeError::DensityRequired { strategy }),
            Some(d) if !(0.0..=1.0).contains(&d) => {
                return Err(MergeError::DensityOutOfRange { density: d });
            }
            Some(_) => {}
        }
    }
    if strategy.is_svd() {
        if spec.svd_rank == Some(0) {
            return Err(MergeError::ZeroSvdRank);
        }
        if let Some(q) = spec.svd_clamp.filter(|q| !(0.0..=1.0).contains(q)) {
            return Err(MergeError::ClampOutOfRange { quantile: q });
        }
    }
    Ok(())
}

/// Groups the components by module path and checks that they agree on each module's shape.
fn plan_modules<'a>(
    components: &[&'a LoraAdapter],
) -> Result<BTreeMap<String, Vec<Present<'a>>>, MergeError> {
    let mut plan: BTreeMap<String, Vec<Present<'a>>> = BTreeMap::new();
    for (index, c) in components.iter().enumerate() {
        for (name, module) in c.modules() {
            plan.entry(name.clone())
                .or_default()
                .push(Present { index, module });
        }
    }
    if plan.is_empty() {
        return Err(MergeError::NoModules);
    }
    for (name, present) in &plan {
        let first = present[0];
        let shape = (first.module.out_features(), first.module.in_features());
        for p in &present[1..] {
            if (p.module.out_features(), p.module.in_features()) != shape {
                return Err(MergeError::ShapeMismatch {
                    module: name.clone(),
                    first: first.index,
                    first_out: shape.0,
                    first_in: shape.1,
                    component: p.index,
                    out_features: p.module.out_features(),
                    in_features: p.module.in_features(),
                });
            }
        }
    }
    Ok(plan)
}

fn check_ranks(
    spec: &MergeSpec,
    strategy: Strategy,
    components: &[&LoraAdapter],
    plan: &BTreeMap<String, Vec<Present<'_>>>,
) -> Result<(), MergeError> {
    if spec.semantics == Semantics::Lorax {
        let ranks: Vec<usize> = components.iter().map(|c| c.config_rank()).collect();
        if ranks.iter().any(|&r| r != ranks[0]) {
            return Err(MergeError::MixedConfigRanks { ranks });
        }
    }
    if strategy.requires_equal_rank() {
        for (name, present) in plan {
            let ranks: Vec<usize> = present.iter().map(|p| p.module.rank()).collect();
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(MergeError::MixedRanks {
                    module: name.clone(),
                    ranks,
                    strategy,
                });
            }
        }
    }
    Ok(())
}

/// Fails if any factor of the present components has a NaN or infinite value.
pub(crate) fn check_finite(name: &str, present: &[Present<'_>]) -> Result<(), MergeError> {
    for p in present {
        for (side, t) in [('A', p.module.a()), ('B', p.module.b())] {
            if !t.is_finite() {
                return Err(MergeError::NonFiniteValue {
                    module: name.to_string(),
                    component: p.index,
                    side,
                });
            }
        }
    }
    Ok(())
}

/// Runs `job` for every module in parallel (after the finite check) and collects the results.
fn par_modules<F>(
    plan: &BTreeMap<String, Vec<Present<'_>>>,
    job: F,
) -> Result<BTreeMap<String, MergedModule>, MergeError>
where
    F: Fn(&str, &[Present<'_>]) -> Result<MergedModule, MergeError> + Sync,
{
    let entries: Vec<(&String, &Vec<Present<'_>>)> = plan.iter().collect();
    entries
        .into_par_iter()
        .map(|(name, present)| {
            check_finite(name, present)?;
            Ok((name.clone(), job(name, present)?))
        })
        .collect()
}

/// `f32` user input widened to the `f64` a Python caller would have typed: the shortest decimal
/// that round-trips to the same `f32` (e.g. `0.7f32` -> `0.7`, not `0.699999988079071`).
pub(crate) fn decimal_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The density as each semantics widens it: PEFT through the shortest decimal, LoRAX exactly
/// (`floor(f64(f32 d) * numel)`, merge-semantics §2.7).
pub(crate) fn widen_density(d: f32, semantics: Semantics) -> f64 {
    match semantics {
        Semantics::Peft => decimal_f64(d),
        Semantics::Lorax => f64::from(d),
    }
}

/// The pruning and combination of a [`Combination`] at a density, for one semantics.
pub(crate) fn prune_and_combine(
    combination: Combination,
    density: Option<f32>,
    spec: &MergeSpec,
) -> (Prune, Combine) {
    let d = density.map_or(1.0, |d| widen_density(d, spec.semantics));
    let prune = if d >= 1.0 {
        Prune::Keep
    } else {
        match combination {
            Combination::Linear => Prune::Keep,
            Combination::Ties | Combination::MagnitudePrune => Prune::Magnitude { density: d },
            Combination::DareLinear | Combination::DareTies => Prune::Random {
                density: d,
                // PEFT >= 0.19 divides kept values by d; at d = 0 nothing is kept (PEFT's 0/0
                // would give NaN), so there is nothing to rescale.
                rescale: (spec.semantics == Semantics::Peft && d > 0.0).then_some(d as f32),
            },
        }
    };
    let combine = if combination.uses_sign_method() {
        Combine::Ties(spec.sign_method)
    } else {
        Combine::Sum
    };
    (prune, combine)
}

/// How the per-factor strategies treat each side of a module.
struct FactorPlan {
    prune: Prune,
    combine: Combine,
    seed: u64,
    semantics: Semantics,
}

impl FactorPlan {
    fn new(spec: &MergeSpec, strategy: Strategy) -> Self {
        let combination = strategy.combination().unwrap_or(Combination::Linear);
        let density = if strategy.uses_density() {
            spec.density
        } else {
            None
        };
        let (prune, combine) = prune_and_combine(combination, density, spec);
        Self {
            prune,
            combine,
            seed: spec.seed,
            semantics: spec.semantics,
        }
    }

    /// Per-side weights of the present components.
    fn side_weights(&self, present: &[Present<'_>], weights: &[f32]) -> (Vec<f32>, Vec<f32>) {
        present
            .iter()
            .map(|p| {
                let w = weights[p.index];
                match self.semantics {
                    Semantics::Lorax => (w, w),
                    Semantics::Peft => {
                        let c = decimal_f64(w) * p.module.scale();
                        let root = c.abs().sqrt();
                        let a = if c >= 0.0 { root } else { -root };
                        (a as f32, root as f32)
                    }
                }
            })
            .unzip()
    }

    fn merge_module(&self, name: &str, present: &[Present<'_>], weights: &[f32]) -> MergedModule {
        let (wa, wb) = self.side_weights(present, weights);
        let first = present[0].module;
        let (r, n_in, n_out) = (first.rank(), first.in_features(), first.out_features());
        let side = |which: StreamSide, w: &[f32]| {
            let inputs: Vec<&[f32]> = present
                .iter()
                .map(|p| {
                    if which == StreamSide::A {
                        p.module.a().data()
                    } else {
                        p.module.b().data()
                    }
                })
                .collect();
            merge_slices(self.prune, self.combine, &inputs, w, |i| {
                keyed_stream(self.seed, name, which, present[i].index as u64)
            })
        };
        let (a, b) = rayon::join(|| side(StreamSide::A, &wa), || side(StreamSide::B, &wb));
        MergedModule {
            a: Matrix::from_vec(r, n_in, a),
            b: Matrix::from_vec(n_out, r, b),
        }
    }
}

#[cfg(test)]
mod tests;
