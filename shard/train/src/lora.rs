//! LoRA adapters in PEFT's form: `y = W x + (alpha / r) · B A dropout(x)` on the targeted
//! projections, with `A: [r, in]` drawn like PEFT (Kaiming-uniform, `a = sqrt(5)`, i.e. uniform
//! on `±1/sqrt(in)`) and `B: [out, r]` zero, so a fresh adapter leaves the base unchanged.

use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::params::{Init, ParamStore, stream};
use medley_shard::model::ModelConfig;

/// A projection a LoRA adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Target {
    /// All seven projections of a decoder layer.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name in PEFT's `target_modules` (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path inside a layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn path_in_layer(self) -> String {
        let block = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        };
        format!("{block}.{}", self.module_name())
    }

    /// `(out, in)` of the projection's weight.
    pub fn dims(self, s: &ModelConfig) -> (usize, usize) {
        let (h, i) = (s.hidden_size, s.intermediate_size);
        match self {
            Target::Q => (s.q_size(), h),
            Target::K | Target::V => (s.kv_size(), h),
            Target::O => (h, s.q_size()),
            Target::Gate | Target::Up => (i, h),
            Target::Down => (h, i),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Target {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, TrainError> {
        Target::ALL
            .into_iter()
            .find(|t| t.module_name() == s || t.module_name().trim_end_matches("_proj") == s)
            .ok_or_else(|| TrainError::Config(format!("unknown LoRA target `{s}`")))
    }
}

/// The adapter's hyper-parameters (PEFT's `LoraConfig` fields that matter here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// The projections adapted in every layer.
    pub targets: Vec<Target>,
    /// Seed of the `A` initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, dropout 0.05, every projection.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: Target::ALL.to_vec(),
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self) -> Result<(), TrainError> {
        if self.rank == 0 || self.targets.is_empty() {
            return Err(TrainError::Config(
                "LoRA needs a positive rank and at least one target".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) || !self.alpha.is_finite() {
            return Err(TrainError::Config(format!(
                "LoRA dropout {} must be in [0, 1) and alpha finite",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// PEFT's dropout on the adapter input: each value kept with probability `1 - p` and scaled by
/// `1 / (1 - p)`, from a seeded stream (one mask per module and call).
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: ChaCha8Rng,
}

impl Dropout {
    /// Dropout with probability `p` drawn from the stream of `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            rng: stream(seed, "lora-dropout"),
        }
    }

    /// `x` with dropout applied (unchanged when `p` is 0).
    pub fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// The factors of one adapter, as trainable tensors named like PEFT's module paths
/// (`model.layers.{i}.self_attn.q_proj.lora_A.weight`, without PEFT's `base_model.model.`
/// prefix).
#[derive(Debug, Clone)]
pub struct LoraSet {
    cfg: LoraConfig,
    params: ParamStore,
    /// `[layer][target]`: `(A, B)` when targeted.
    factors: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

impl LoraSet {
    /// A fresh adapter for a model of `shape`: `A` Kaiming-uniform, `B` zero.
    pub fn init(
        shape: &ModelConfig,
        cfg: &LoraConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        let mut params = ParamStore::new(dtype, device.clone());
        let mut factors = Vec::with_capacity(shape.num_hidden_layers);
        for l in 0..shape.num_hidden_layers {
            let mut row: [Option<(Tensor, Tensor)>; 7] = Default::default();
            for &t in &cfg.targets {
                let (out, inp) = t.dims(shape);
                let path = module_path(l, t);
                let a = params.init(
                    cfg.seed,
                    &format!("{path}.lora_A.weight"),
                    &[cfg.rank, inp],
                    Init::Uniform(1.0 / (inp as f64).sqrt()),
                )?;
                let b = params.init(
                    cfg.seed,
                    &format!("{path}.lora_B.weight"),
                    &[out, cfg.rank],
                    Init::Zeros,
                )?;
                row[t.index()] = Some((a, b));
            }
            factors.push(row);
        }
        Ok(Self {
            cfg: cfg.clone(),
            params,
            factors,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// The factors by name (`<module path>.lora_A.weight` / `.lora_B.weight`).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// `(A, B)` of `target` in `layer`, when adapted.
    pub fn factors(&self, layer: usize, target: Target) -> Option<&(Tensor, Tensor)> {
        self.factors.get(layer)?[target.index()].as_ref()
    }

    /// `scale · (dropout(x) Aᵀ) Bᵀ` for `x: [rows, in]`, or `None` when not adapted.
    pub fn delta(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        dropout: Option<&mut Dropout>,
    ) -> Option<Result<Tensor, TrainError>> {
        let (a, b) = self.factors(layer, target)?;
        let run = || -> candle_core::Result<Tensor> {
            let x = match dropout {
                Some(d) => d.apply(x)?,
                None => x.clone(),
            };
            x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.cfg.scale()
        };
        Some(run().map_err(TrainError::from))
    }
}

impl LoraSet {
    /// PEFT's `cat` merge of `(adapter, weight)` pairs: factors stacked along the rank, each `B`
    /// scaled by its weight and its adapter's `alpha / r`, merged scale 1. Its update is exactly
    /// `Σ weight_i · scale_i · B_i A_i` on every module some adapter targets.
    pub fn concat(parts: &[(&LoraSet, f64)]) -> Result<Self, TrainError> {
        let Some((first, _)) = parts.first() else {
            return Err(TrainError::Config("nothing to merge".into()));
        };
        let (dtype, device) = (first.params.dtype(), first.params.device().clone());
        let layers = parts
            .iter()
            .map(|(p, _)| p.factors.len())
            .max()
            .unwrap_or(0);
        let mut params = ParamStore::new(dtype, device);
        let mut factors = Vec::with_capacity(layers);
        let mut targets = Vec::new();
        for l in 0..layers {
            let mut row: [Option<(Tensor, Tensor)>; 7] = Default::default();
            for t in Target::ALL {
                let (mut a_parts, mut b_parts) = (Vec::new(), Vec::new());
                for (set, w) in parts {
                    if let Some((a, b)) = set.factors(l, t) {
                        a_parts.push(a.detach());
                        b_parts.push((b.detach() * (w * set.cfg.scale()))?);
                    }
                }
                if a_parts.is_empty() {
                    continue;
                }
                if !targets.contains(&t) {
                    targets.push(t);
                }
                let path = module_path(l, t);
                let a =
                    params.insert(&format!("{path}.lora_A.weight"), Tensor::cat(&a_parts, 0)?)?;
                let b =
                    params.insert(&format!("{path}.lora_B.weight"), Tensor::cat(&b_parts, 1)?)?;
                row[t.index()] = Some((a, b));
            }
            factors.push(row);
        }
        let rank: usize = parts.iter().map(|(p, _)| p.cfg.rank).sum();
        Ok(Self {
            cfg: LoraConfig {
                rank,
                alpha: rank as f64,
                dropout: 0.0,
                targets,
                seed: 0,
            },
            params,
            factors,
        })
    }
}

/// The PEFT module path of `target` in `layer` (`model.layers.{l}.self_attn.q_proj`).
pub fn module_path(layer: usize, target: Target) -> String {
    format!("model.layers.{layer}.{}", target.path_in_layer())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::params::draw;
    use medley_shard::model::LlamaDims;

    fn random_b(set: &LoraSet, seed: u64) {
        for (name, var) in set.params().iter() {
            if name.contains("lora_B") {
                let v = draw(seed, name, var.elem_count(), Init::Normal(0.5)).unwrap();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }

    /// The `cat` merge's update is the weighted sum of the adapters' updates, also where only
    /// one adapter targets a module.
    #[test]
    fn concat_is_the_weighted_sum_of_updates() {
        let shape = ModelConfig::llama(LlamaDims {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
        });
        let a_cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec![Target::Q, Target::Down],
            ..LoraConfig::default()
        };
        let b_cfg = LoraConfig {
            rank: 3,
            alpha: 3.0,
            targets: vec![Target::Q],
            seed: 1,
            ..LoraConfig::default()
        };
        let a = LoraSet::init(&shape, &a_cfg, DType::F32, &Device::Cpu).unwrap();
        let b = LoraSet::init(&shape, &b_cfg, DType::F32, &Device::Cpu).unwrap();
        random_b(&a, 1);
        random_b(&b, 2);
        let merged = LoraSet::concat(&[(&a, 0.5), (&b, -2.0)]).unwrap();
        let x = Tensor::from_vec(
            draw(3, "x", 3 * 8, Init::Normal(1.0)).unwrap(),
            (3, 8),
            &Device::Cpu,
        )
        .unwrap();
        let d = |s: &LoraSet| s.delta(0, Target::Q, &x, None).unwrap().unwrap();
        let want = ((d(&a) * 0.5).unwrap() + (d(&b) * -2.0).unwrap()).unwrap();
        let diff = (d(&merged) - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let x12 = Tensor::ones((2, 12), DType::F32, &Device::Cpu).unwrap();
        let down = |s: &LoraSet| s.delta(0, Target::Down, &x12, None).unwrap().unwrap();
        let diff = (down(&merged) - (down(&a) * 0.5).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        assert!(merged.factors(0, Target::K).is_none());
    }
}
