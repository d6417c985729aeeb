//! The errors of `medley eval`, and the exit code each one maps to.

use std::path::PathBuf;

/// Everything that can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A command-line value is invalid (bad number list, sweep without adapters...).
    #[error("invalid arguments: {0}")]
    Args(String),
    /// A task file cannot be read.
    #[error("{path}: {source}")]
    TaskIo {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// A task file has a bad line (`line` is 1-based; 0 when the problem is the whole file).
    #[error("{}", task_location(path, *line, message))]
    TaskFile {
        /// The file.
        path: PathBuf,
        /// The 1-based line number (0: the file as a whole, e.g. no examples).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A `--merge` spec is not valid `merged_adapters` JSON.
    #[error("--merge {spec}: {message}")]
    MergeSpec {
        /// The spec as given (inline JSON or `@path`).
        spec: String,
        /// What is wrong with it.
        message: String,
    },
    /// The endpoint cannot be reached at all.
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable {
        /// The endpoint URL.
        endpoint: String,
        /// The last connection error.
        message: String,
    },
    /// A request of one system failed (HTTP error, or a connection error after the retries).
    #[error("system `{label}`: {source}")]
    System {
        /// The system's label.
        label: String,
        /// The failure.
        source: crate::client::ClientError,
    },
    /// An output file (JSON, chart) cannot be written.
    #[error("writing {path}: {message}")]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The HTTP client or the async runtime cannot be set up.
    #[error("{0}")]
    Setup(String),
}

fn task_location(path: &std::path::Path, line: usize, message: &str) -> String {
    if line == 0 {
        format!("{}: {message}", path.display())
    } else {
        format!("{}:{line}: {message}", path.display())
    }
}

impl EvalError {
    /// The process exit code for this error: 1 a system failed, 2 invalid input (arguments, task
    /// files, merge specs), 3 the endpoint is unreachable, 4 an output cannot be written or the
    /// client cannot be set up.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::System { .. } => 1,
            Self::Args(_)
            | Self::TaskIo { .. }
            | Self::TaskFile { .. }
            | Self::MergeSpec { .. } => 2,
            Self::Unreachable { .. } => 3,
            Self::Output { .. } | Self::Setup(_) => 4,
        }
    }
}
