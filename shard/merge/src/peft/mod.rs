//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Reading ([`read_adapter_dir`], [`parse_adapter`]) accepts LoRA adapters stored in f32, bf16 or
//! f16 (converted to f32) with tensors named `base_model.model.<module path>.lora_A.weight`
//! (`[r, in]`) and `.lora_B.weight` (`[out, r]`); each module's scale follows PEFT
//! (`alpha/r` or `alpha/sqrt(r)`, with `rank_pattern`/`alpha_pattern` matched like PEFT's
//! `get_pattern_key`). Unsupported features (DoRA, `modules_to_save`, embedding LoRA,
//! `layers_to_transform`, trained biases, ...) are refused with [`PeftError::Unsupported`].
//!
//! Writing ([`write_merged_dir`]) produces a directory PEFT loads with
//! `PeftModel.from_pretrained`: scale 1 (`r = lora_alpha`), per-module ranks via
//! `rank_pattern`/`alpha_pattern` where they differ from `r`.

mod config;
mod read;
mod write;

use thiserror::Error;

pub use config::{AdapterConfig, TargetModules, scaling};
pub use read::{PeftAdapter, parse_adapter, read_adapter_dir};
pub use write::{
    TensorDtype, WriteOptions, encode_safetensors, merged_target_modules, write_adapter_files,
    write_merged_dir,
};

/// File name of the adapter config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every tensor name in a saved PEFT adapter.
pub const TENSOR_PREFIX: &str = "base_model.model.";

/// Problems reading or writing PEFT adapters.
#[derive(Debug, Error)]
pub enum PeftError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Malformed or invalid `adapter_config.json`.
    #[error("invalid adapter config: {0}")]
    Config(String),
    /// A `rank_pattern`/`alpha_pattern` key is not a valid regular expression.
    #[error("pattern key '{key}' is not a supported regular expression: {message}")]
    Pattern {
        /// The key.
        key: String,
        /// Regex error.
        message: String,
    },
    /// The adapter uses a PEFT feature Medley does not support.
    #[error("unsupported adapter feature {feature}: {detail} cannot be served or merged")]
    Unsupported {
        /// Config field or tensor kind.
        feature: String,
        /// Explanation.
        detail: String,
    },
    /// Malformed safetensors data.
    #[error("invalid adapter_model.safetensors: {0}")]
    Safetensors(String),
    /// A tensor that is not a LoRA factor.
    #[error(
        "unexpected tensor {name}: only base_model.model.<module>.lora_A.weight / lora_B.weight are supported"
    )]
    UnexpectedTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor dtype other than f32/bf16/f16, or a tensor that is not 2-D.
    #[error("tensor {name}: {detail}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A module has only one of its two factors.
    #[error("module {module} has no {missing} tensor")]
    MissingFactor {
        /// Module path.
        module: String,
        /// `lora_A` or `lora_B`.
        missing: &'static str,
    },
    /// The tensor rank differs from the config's rank for that module.
    #[error("module {module}: tensors have rank {found} but the config gives rank {expected}")]
    RankMismatch {
        /// Module path.
        module: String,
        /// Rank from `r`/`rank_pattern`.
        expected: usize,
        /// Rank of the tensors.
        found: usize,
    },
    /// A tensor holds NaN or infinity.
    #[error("tensor {name} contains NaN or infinite values")]
    NonFinite {
        /// Tensor name.
        name: String,
    },
    /// Factor shapes are inconsistent.
    #[error(transparent)]
    Shape(#[from] crate::adapter::AdapterShapeError),
}

impl PeftError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        PeftError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
