//! In-memory LoRA adapters: the engine's input ([`LoraAdapter`]) and output ([`MergedAdapter`]),
//! and the check of an adapter against the base model's module shapes.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::matrix::Matrix;

/// Shape problems of adapters.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AdapterShapeError {
    /// `A` and `B` disagree on the rank, or a factor is empty.
    #[error(
        "module {module}: lora_A is {a_rows}x{a_cols} and lora_B is {b_rows}x{b_cols}; expected A [r, in] and B [out, r] with the same r > 0"
    )]
    Factors {
        /// Module path.
        module: String,
        /// Rows of A (r).
        a_rows: usize,
        /// Columns of A (in).
        a_cols: usize,
        /// Rows of B (out).
        b_rows: usize,
        /// Columns of B (r).
        b_cols: usize,
    },
    /// The scale is not a finite number.
    #[error("module {module}: scale {scale} is not finite")]
    Scale {
        /// Module path.
        module: String,
        /// The scale.
        scale: f64,
    },
    /// The adapter has a module the base model does not have.
    #[error(
        "adapter module {module} does not exist in the base model; the adapter was trained for another base model"
    )]
    UnknownModule {
        /// Module path.
        module: String,
    },
    /// The adapter's module shape differs from the base model's.
    #[error(
        "adapter module {module} is (out {out_features}, in {in_features}) but the base model's is (out {base_out}, in {base_in}); the adapter was trained for another base model"
    )]
    Mismatch {
        /// Module path.
        module: String,
        /// Adapter output features (rows of B).
        out_features: usize,
        /// Adapter input features (columns of A).
        in_features: usize,
        /// Base output features.
        base_out: usize,
        /// Base input features.
        base_in: usize,
    },
}

/// The LoRA factors of one module: `delta W = scale * B @ A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    a: Matrix,
    b: Matrix,
    scale: f64,
}

impl LoraModule {
    /// Checks that `a` is `[r, in]` and `b` is `[out, r]` with `r > 0` and the scale is finite.
    pub fn new(module: &str, a: Matrix, b: Matrix, scale: f64) -> Result<Self, AdapterShapeError> {
        if a.rows() == 0 || a.rows() != b.cols() || a.cols() == 0 || b.rows() == 0 {
            return Err(AdapterShapeError::Factors {
                module: module.to_string(),
                a_rows: a.rows(),
                a_cols: a.cols(),
                b_rows: b.rows(),
                b_cols: b.cols(),
            });
        }
        if !scale.is_finite() {
            return Err(AdapterShapeError::Scale {
                module: module.to_string(),
                scale,
            });
        }
        Ok(Self { a, b, scale })
    }

    /// `lora_A` (`[r, in]`).
    pub fn a(&self) -> &Matrix {
        &self.a
    }

    /// `lora_B` (`[out, r]`).
    pub fn b(&self) -> &Matrix {
        &self.b
    }

    /// The module's scale (`alpha/r`, or `alpha/sqrt(r)` with rsLoRA, after rank/alpha patterns).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.a.cols()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.b.rows()
    }
}

/// A LoRA adapter as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    config_rank: usize,
    config_scale: f64,
    modules: BTreeMap<String, LoraModule>,
}

impl LoraAdapter {
    /// An adapter with the config-level rank and scale (`r` and `alpha/r` from its config,
    /// ignoring rank/alpha patterns: LoRAX's view) and its modules keyed by module path
    /// (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn new(
        config_rank: usize,
        config_scale: f64,
        modules: BTreeMap<String, LoraModule>,
    ) -> Self {
        Self {
            config_rank,
            config_scale,
            modules,
        }
    }

    /// The config-level `r`.
    pub fn config_rank(&self) -> usize {
        self.config_rank
    }

    /// The config-level scale (LoRAX applies adapter 0's to a merge).
    pub fn config_scale(&self) -> f64 {
        self.config_scale
    }

    /// Modules by path.
    pub fn modules(&self) -> &BTreeMap<String, LoraModule> {
        &self.modules
    }

    /// Size of the factors in bytes (as f32).
    pub fn byte_size(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.byte_size() + m.b.byte_size())
            .sum()
    }

    /// Checks every module against the base model's `(out, in)` shapes by module path. Fails on
    /// the first module (in path order) the base lacks or whose shape differs.
    pub fn check_base_shapes(
        &self,
        base: &BTreeMap<String, (usize, usize)>,
    ) -> Result<(), AdapterShapeError> {
        for (name, m) in &self.modules {
            let Some(&(base_out, base_in)) = base.get(name) else {
                return Err(AdapterShapeError::UnknownModule {
                    module: name.clone(),
                });
            };
            if (m.out_features(), m.in_features()) != (base_out, base_in) {
                return Err(AdapterShapeError::Mismatch {
                    module: name.clone(),
                    out_features: m.out_features(),
                    in_features: m.in_features(),
                    base_out,
                    base_in,
                });
            }
        }
        Ok(())
    }
}

/// One merged module: `delta W = scale * B @ A` with the adapter's `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedModule {
    /// `lora_A` (`[r, in]`).
    pub a: Matrix,
    /// `lora_B` (`[out, r]`).
    pub b: Matrix,
}

impl MergedModule {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.a.rows()
    }
}

/// The result of a merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedAdapter {
    /// Scale to apply to every module: 1 in PEFT semantics, adapter 0's `alpha/r` in LoRAX
    /// semantics.
    pub scale: f64,
    /// Modules by path.
    pub modules: BTreeMap<String, MergedModule>,
}

impl MergedAdapter {
    /// The largest module rank (PEFT's `r` of the merged config).
    pub fn rank(&self) -> usize {
        self.modules
            .values()
            .map(MergedModule::rank)
            .max()
            .unwrap_or(0)
    }

    /// Size of the factors in bytes (as f32).
    pub fn byte_size(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.byte_size() + m.b.byte_size())
            .sum()
    }

    /// SHA-256 over the scale, module paths, shapes and f32 bit patterns: equal hashes mean
    /// bit-identical merges.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"medley-merged-adapter/v1\0");
        h.update(self.scale.to_bits().to_le_bytes());
        for (name, m) in &self.modules {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            for t in [&m.a, &m.b] {
                h.update((t.rows() as u64).to_le_bytes());
                h.update((t.cols() as u64).to_le_bytes());
                for v in t.data() {
                    h.update(v.to_bits().to_le_bytes());
                }
            }
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(r: usize, out: usize, inp: usize) -> LoraModule {
        LoraModule::new("m", Matrix::zeros(r, inp), Matrix::zeros(out, r), 2.0).unwrap()
    }

    #[test]
    fn factor_shapes_are_validated() {
        let err =
            LoraModule::new("x.q", Matrix::zeros(4, 8), Matrix::zeros(8, 3), 1.0).unwrap_err();
        assert!(err.to_string().contains("x.q"));
        assert!(LoraModule::new("x", Matrix::zeros(2, 8), Matrix::zeros(8, 2), f64::NAN).is_err());
    }

    #[test]
    fn base_shape_check_names_the_module() {
        let mut mods = BTreeMap::new();
        mods.insert(
            "model.layers.0.self_attn.k_proj".to_string(),
            module(4, 64, 64),
        );
        let adapter = LoraAdapter::new(4, 2.0, mods);
        let mut base = BTreeMap::new();
        base.insert("model.layers.0.self_attn.k_proj".to_string(), (32, 64));
        let err = adapter.check_base_shapes(&base).unwrap_err();
        assert!(matches!(
            err,
            AdapterShapeError::Mismatch { base_out: 32, .. }
        ));
        assert!(err.to_string().contains("model.layers.0.self_attn.k_proj"));
        base.insert("model.layers.0.self_attn.k_proj".to_string(), (64, 64));
        assert!(adapter.check_base_shapes(&base).is_ok());
        base.clear();
        let err = adapter.check_base_shapes(&base).unwrap_err();
        assert!(matches!(err, AdapterShapeError::UnknownModule { .. }));
    }
}
