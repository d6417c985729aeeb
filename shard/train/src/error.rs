//! The crate's error type.

use std::path::PathBuf;

/// Errors of model building, training and saving.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The training data cannot be used (empty, sequences too short, tokens out of range).
    #[error("invalid training data: {0}")]
    Data(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// JSON encoding or decoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing or reading a PEFT adapter directory failed.
    #[error(transparent)]
    Peft(#[from] medley_merge::peft::PeftError),
    /// The loss became NaN or infinite.
    #[error("loss is not finite at step {step}")]
    Diverged {
        /// The optimiser step.
        step: usize,
    },
    /// The demo's data or tokenizer failed.
    #[error("demo data: {0}")]
    Demo(String),
    /// Tensor operation failure.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A base checkpoint could not be read.
    #[error("base model: {0}")]
    Model(#[from] medley_shard::model::ModelError),
    /// A GGUF base file could not be read.
    #[error("GGUF base: {0}")]
    Gguf(#[from] medley_hub::gguf::GgufError),
}

impl TrainError {
    /// An [`TrainError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
