//! Deterministic random PEFT LoRA adapters for tests, goldens and benchmarks.
//!
//! `A` is uniform in `±1/sqrt(in)` (the scale of PEFT's Kaiming init), `B` uniform in
//! `±b_range` (non-zero, unlike a fresh PEFT adapter), each tensor drawn from a ChaCha8 stream
//! keyed by (seed, module path, factor): the same fixture is byte-identical everywhere.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::adapter::{LoraAdapter, LoraModule};
use crate::matrix::Matrix;
use crate::peft::{PeftError, TENSOR_PREFIX, TensorDtype, scaling, write_adapter_files};
use crate::rng::{StreamSide, fill_uniform_pm1, fixture_stream};

/// Shape of a Llama-family decoder, enough to list its linear modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl LlamaShape {
    /// The committed tiny test model (`tests/fixtures/tiny-llama`).
    pub fn tiny() -> Self {
        Self {
            hidden: 64,
            intermediate: 176,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        }
    }

    /// TinyLlama-1.1B.
    pub fn tinyllama() -> Self {
        Self {
            hidden: 2048,
            intermediate: 5632,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            head_dim: 64,
        }
    }

    /// SmolLM2-135M (the real model of the GGUF tests).
    pub fn smollm2() -> Self {
        Self {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
        }
    }

    /// `(out, in)` of every attention and MLP projection, by module path.
    pub fn module_shapes(&self) -> BTreeMap<String, (usize, usize)> {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut out = BTreeMap::new();
        for l in 0..self.layers {
            for (name, shape) in [
                ("self_attn.q_proj", (q, h)),
                ("self_attn.k_proj", (kv, h)),
                ("self_attn.v_proj", (kv, h)),
                ("self_attn.o_proj", (h, q)),
                ("mlp.gate_proj", (i, h)),
                ("mlp.up_proj", (i, h)),
                ("mlp.down_proj", (h, i)),
            ] {
                out.insert(format!("model.layers.{l}.{name}"), shape);
            }
        }
        out
    }
}

/// A random adapter description.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFixture {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Targeted module names (last path segments, e.g. `q_proj`).
    pub targets: Vec<String>,
    /// Stored dtype.
    pub dtype: TensorDtype,
    /// Seed of all values.
    pub seed: u64,
    /// Half-width of the uniform distribution of `B`.
    pub b_range: f32,
    /// `base_model_name_or_path` written to the config.
    pub base_model_name_or_path: Option<String>,
}

impl AdapterFixture {
    /// Rank-`rank` fixture targeting all seven Llama projections, alpha = 2r, f32, `b_range` 0.05.
    pub fn new(rank: usize, seed: u64) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f64,
            use_rslora: false,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            dtype: TensorDtype::F32,
            seed,
            b_range: 0.05,
            base_model_name_or_path: None,
        }
    }

    fn targeted<'a>(
        &'a self,
        shapes: &'a BTreeMap<String, (usize, usize)>,
    ) -> impl Iterator<Item = (&'a String, (usize, usize))> {
        shapes
            .iter()
            .filter(|(path, _)| {
                self.targets
                    .iter()
                    .any(|t| path.rsplit('.').next() == Some(t.as_str()))
            })
            .map(|(p, &s)| (p, s))
    }

    /// The factors of every targeted module, as stored (bf16 values already rounded).
    pub fn module_factors(
        &self,
        shapes: &BTreeMap<String, (usize, usize)>,
    ) -> BTreeMap<String, (Matrix, Matrix)> {
        let round = |mut m: Matrix| {
            if self.dtype == TensorDtype::Bf16 {
                m.data_mut()
                    .iter_mut()
                    .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            }
            m
        };
        self.targeted(shapes)
            .map(|(path, (out, inp))| {
                let mut a = Matrix::zeros(self.rank, inp);
                fill_uniform_pm1(
                    &mut fixture_stream(self.seed, path, StreamSide::A),
                    a.data_mut(),
                );
                let ka = 1.0 / (inp as f32).sqrt();
                a.data_mut().iter_mut().for_each(|v| *v *= ka);
                let mut b = Matrix::zeros(out, self.rank);
                fill_uniform_pm1(
                    &mut fixture_stream(self.seed, path, StreamSide::B),
                    b.data_mut(),
                );
                b.data_mut().iter_mut().for_each(|v| *v *= self.b_range);
                (path.clone(), (round(a), round(b)))
            })
            .collect()
    }

    /// The adapter in memory (what reading the written files gives).
    pub fn adapter(
        &self,
        shapes: &BTreeMap<String, (usize, usize)>,
    ) -> Result<LoraAdapter, PeftError> {
        let scale = scaling(self.alpha, self.rank, self.use_rslora);
        let modules = self
            .module_factors(shapes)
            .into_iter()
            .map(|(path, (a, b))| Ok((path.clone(), LoraModule::new(&path, a, b, scale)?)))
            .collect::<Result<BTreeMap<_, _>, PeftError>>()?;
        Ok(LoraAdapter::new(self.rank, scale, modules))
    }

    /// The `adapter_config.json` contents.
    pub fn config_json(&self) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.targets,
            "fan_in_fan_out": false,
            "bias": "none",
            "lora_dropout": 0.0,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": true,
        })
    }

    /// Writes the adapter as a PEFT directory.
    pub fn write(
        &self,
        dir: &Path,
        shapes: &BTreeMap<String, (usize, usize)>,
    ) -> Result<(), PeftError> {
        let tensors: Vec<(String, Matrix)> = self
            .module_factors(shapes)
            .into_iter()
            .flat_map(|(path, (a, b))| {
                [
                    (format!("{TENSOR_PREFIX}{path}.lora_A.weight"), a),
                    (format!("{TENSOR_PREFIX}{path}.lora_B.weight"), b),
                ]
            })
            .collect();
        write_adapter_files(dir, &self.config_json(), &tensors, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::read_adapter_dir;

    #[test]
    fn shapes_of_the_presets() {
        let tiny = LlamaShape::tiny().module_shapes();
        assert_eq!(tiny.len(), 14);
        assert_eq!(tiny["model.layers.1.self_attn.k_proj"], (32, 64));
        assert_eq!(tiny["model.layers.0.mlp.down_proj"], (64, 176));
        let tl = LlamaShape::tinyllama().module_shapes();
        assert_eq!(tl.len(), 22 * 7);
        assert_eq!(tl["model.layers.21.self_attn.v_proj"], (256, 2048));
        assert_eq!(tl["model.layers.3.mlp.gate_proj"], (5632, 2048));
    }

    #[test]
    fn written_fixture_reads_back_identically() {
        let shapes = LlamaShape::tiny().module_shapes();
        for dtype in [TensorDtype::F32, TensorDtype::Bf16] {
            let mut fx = AdapterFixture::new(4, 11);
            fx.targets = vec!["q_proj".into(), "down_proj".into()];
            fx.dtype = dtype;
            fx.use_rslora = true;
            let dir = tempfile::tempdir().unwrap();
            fx.write(dir.path(), &shapes).unwrap();
            let read = read_adapter_dir(dir.path()).unwrap();
            let mem = fx.adapter(&shapes).unwrap();
            assert_eq!(read.adapter, mem);
            assert_eq!(mem.modules().len(), 4);
            assert_eq!(mem.config_scale(), 8.0 / 2.0);
            assert!(
                mem.modules()
                    .values()
                    .all(|m| m.b().data().iter().any(|&v| v != 0.0))
            );
            mem.check_base_shapes(&shapes).unwrap();
        }
        // Deterministic from the seed, different across seeds.
        let a = AdapterFixture::new(2, 1).adapter(&shapes).unwrap();
        assert_eq!(a, AdapterFixture::new(2, 1).adapter(&shapes).unwrap());
        assert_ne!(a, AdapterFixture::new(2, 2).adapter(&shapes).unwrap());
    }
}
