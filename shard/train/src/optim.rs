//! AdamW (`candle_nn::AdamW`) with linear warmup, cosine decay and global-norm gradient clipping.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::params::ParamStore;

/// AdamW's hyper-parameters and gradient clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate (reached after warmup).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay of matrices (norm weights are never decayed).
    pub weight_decay: f64,
    /// Largest global gradient L2 norm; larger gradients are scaled down to it.
    pub clip_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: Some(1.0),
        }
    }
}

/// Learning-rate schedule: linear warmup from 0, then cosine decay to `min_lr_ratio · lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Total optimiser steps (the cosine reaches its floor here).
    pub total_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl ScheduleConfig {
    /// The learning-rate multiplier at `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over a [`ParamStore`]: matrices with weight decay, vectors (norms) without.
pub struct Optimizer {
    decay: AdamW,
    no_decay: AdamW,
    vars: Vec<Var>,
    cfg: OptimConfig,
    schedule: ScheduleConfig,
    step: usize,
    /// Gradients of the step so far ([`Self::accumulate`]).
    pending: Option<GradStore>,
}

impl Optimizer {
    /// An optimiser for every tensor of `params`.
    pub fn new(
        params: &ParamStore,
        cfg: &OptimConfig,
        schedule: &ScheduleConfig,
    ) -> Result<Self, TrainError> {
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) || schedule.total_steps == 0 {
            return Err(TrainError::Config(
                "learning rate and total steps must be positive".into(),
            ));
        }
        let adamw = |wd: f64, vars: Vec<Var>| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr: cfg.lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    weight_decay: wd,
                },
            )
        };
        let (mats, vecs): (Vec<Var>, Vec<Var>) = params
            .iter()
            .map(|(_, v)| v.clone())
            .partition(|v| v.rank() >= 2);
        let vars = params.iter().map(|(_, v)| v.clone()).collect();
        Ok(Self {
            decay: adamw(cfg.weight_decay, mats)?,
            no_decay: adamw(0.0, vecs)?,
            vars,
            cfg: cfg.clone(),
            schedule: schedule.clone(),
            step: 0,
            pending: None,
        })
    }

    /// Backpropagates `loss`, clips the gradients and updates the parameters.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepStats, TrainError> {
        self.accumulate(loss)?;
        self.step_accumulated()
    }

    /// Backpropagates `loss` and adds its gradients to those of the step so far. A loss of
    /// several terms can go term by term: each term's graph is freed before the next is built
    /// (the sum of the gradients is the gradient of the sum).
    pub fn accumulate(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        let grads = loss.backward()?;
        let Some(sum) = self.pending.as_mut() else {
            self.pending = Some(grads);
            return Ok(());
        };
        for v in &self.vars {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let total = match sum.get(v.as_tensor()) {
                Some(s) => (s + g)?,
                None => g.clone(),
            };
            sum.insert(v.as_tensor(), total);
        }
        Ok(())
    }

    /// Clips the accumulated gradients and updates the parameters (the next step starts from
    /// no gradients).
    pub fn step_accumulated(&mut self) -> Result<StepStats, TrainError> {
        let mut grads = self
            .pending
            .take()
            .ok_or_else(|| TrainError::Config("an optimiser step without a loss".into()))?;
        let grad_norm = global_norm(&grads, &self.vars)?;
        if let Some(max) = self.cfg.clip_norm
            && grad_norm > max
        {
            let factor = max / (grad_norm + 1e-6);
            for v in &self.vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let scaled = (g * factor)?;
                    grads.insert(v.as_tensor(), scaled);
                }
            }
        }
        let lr = self.cfg.lr * self.schedule.factor(self.step);
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
        self.decay.step(&grads)?;
        self.no_decay.step(&grads)?;
        self.step += 1;
        Ok(StepStats { lr, grad_norm })
    }
}

/// The L2 norm of every variable's gradient together.
pub fn global_norm(grads: &GradStore, vars: &[Var]) -> Result<f64, TrainError> {
    let mut sum = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = ScheduleConfig {
            warmup_steps: 4,
            total_steps: 14,
            min_lr_ratio: 0.1,
        };
        assert_eq!(s.factor(0), 0.25);
        assert_eq!(s.factor(3), 1.0);
        assert_eq!(s.factor(4), 1.0);
        assert!((s.factor(9) - 0.55).abs() < 1e-12);
        assert!((s.factor(14) - 0.1).abs() < 1e-12);
        assert!((s.factor(100) - 0.1).abs() < 1e-12);
    }

    /// Two loss terms backpropagated one at a time move the parameters as their sum does in one
    /// pass (clipping included: it sees the summed gradients).
    #[test]
    fn accumulated_terms_step_like_their_sum() {
        #![allow(clippy::unwrap_used)]
        use candle_core::Device;
        let cfg = OptimConfig {
            clip_norm: Some(0.5),
            ..OptimConfig::default()
        };
        let schedule = ScheduleConfig {
            warmup_steps: 0,
            total_steps: 4,
            min_lr_ratio: 1.0,
        };
        let run = |split: bool| -> Vec<f32> {
            let mut params = ParamStore::new(DType::F32, Device::Cpu);
            let w = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap();
            let w = params.insert("w", w).unwrap();
            let mut opt = Optimizer::new(&params, &cfg, &schedule).unwrap();
            for _ in 0..3 {
                let a = w.sqr().unwrap().sum_all().unwrap();
                let b = (w.sum_all().unwrap() * 3.0).unwrap();
                if split {
                    opt.accumulate(&a).unwrap();
                    opt.accumulate(&b).unwrap();
                    opt.step_accumulated().unwrap();
                } else {
                    opt.backward_step(&(a + b).unwrap()).unwrap();
                }
            }
            let out = params.get("w").unwrap();
            out.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (one, two) = (run(false), run(true));
        assert!(one != vec![0.5, -1.0, 2.0, 0.25], "{one:?}");
        for (x, y) in one.iter().zip(&two) {
            assert!((x - y).abs() < 1e-6, "{one:?} vs {two:?}");
        }
        let params = ParamStore::new(DType::F32, Device::Cpu);
        let mut empty = Optimizer::new(&params, &cfg, &schedule).unwrap();
        assert!(empty.step_accumulated().is_err());
    }
}
