//! Router configuration: clap arguments (every flag also read from an environment variable) and
//! the plain config structs the rest of the router receives.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Serving limits and defaults, shared by the `medley-router` binary and `medley serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    /// Address the HTTP and gRPC listeners bind to.
    #[arg(long, env = "MEDLEY_HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: String,
    /// HTTP port (LoRAX/TGI-compatible REST).
    #[arg(long, short = 'p', env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Public gRPC port (medley.v1, health, reflection).
    #[arg(long, env = "GRPC_PORT", default_value_t = 8081)]
    pub grpc_port: u16,
    /// Maximum number of requests in flight (queued or running); more get 429.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Maximum number of prompt tokens.
    #[arg(long, env = "MAX_INPUT_LENGTH", default_value_t = 1024)]
    pub max_input_length: u32,
    /// Maximum prompt + generated tokens of one request.
    #[arg(long, env = "MAX_TOTAL_TOKENS", default_value_t = 2048)]
    pub max_total_tokens: u32,
    /// Maximum number of stop sequences.
    #[arg(long, env = "MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Maximum `return_k_alternatives`.
    #[arg(long, env = "MAX_TOP_N_TOKENS", default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// `max_new_tokens` used when a request gives none (never more than the room left).
    #[arg(long, env = "DEFAULT_MAX_NEW_TOKENS", default_value_t = 256)]
    pub default_max_new_tokens: u32,
    /// Number of tokenizer worker threads.
    #[arg(long, env = "VALIDATION_WORKERS", default_value_t = 2)]
    pub validation_workers: usize,
    /// Maximum prompt tokens in one prefill step.
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_batch_prefill_tokens: u32,
    /// Maximum tokens (prompt + max new) of all running requests; defaults to what the shards
    /// report after warmup.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<u32>,
    /// Maximum requests in one batch.
    #[arg(long, env = "MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Add waiting requests to a running batch only when at least this fraction of the batch
    /// size is waiting (unless they waited `max_waiting_tokens` steps).
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 0.3)]
    pub waiting_served_ratio: f32,
    /// Decode steps a waiting request may be held back before it is forced into the batch.
    #[arg(long, env = "MAX_WAITING_TOKENS", default_value_t = 20)]
    pub max_waiting_tokens: usize,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,
}

/// Limits enforced by validation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// See [`RouterArgs::max_concurrent_requests`].
    pub max_concurrent_requests: usize,
    /// See [`RouterArgs::max_input_length`].
    pub max_input_length: u32,
    /// See [`RouterArgs::max_total_tokens`].
    pub max_total_tokens: u32,
    /// See [`RouterArgs::max_stop_sequences`].
    pub max_stop_sequences: usize,
    /// See [`RouterArgs::max_top_n_tokens`].
    pub max_top_n_tokens: u32,
    /// See [`RouterArgs::default_max_new_tokens`].
    pub default_max_new_tokens: u32,
    /// See [`RouterArgs::validation_workers`].
    pub validation_workers: usize,
}

/// Continuous-batching budgets.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// See [`RouterArgs::max_batch_prefill_tokens`].
    pub max_batch_prefill_tokens: u32,
    /// See [`RouterArgs::max_batch_total_tokens`].
    pub max_batch_total_tokens: Option<u32>,
    /// See [`RouterArgs::max_batch_size`].
    pub max_batch_size: Option<usize>,
    /// See [`RouterArgs::waiting_served_ratio`].
    pub waiting_served_ratio: f32,
    /// See [`RouterArgs::max_waiting_tokens`].
    pub max_waiting_tokens: usize,
}

/// Everything the router needs to run.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Public gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Model name reported by `/info` and `x-model-id`.
    pub model_id: String,
    /// Path of the model's `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// Unix socket of each shard, rank 0 first.
    pub shard_uds_paths: Vec<PathBuf>,
    /// Validation limits.
    pub limits: Limits,
    /// Batching budgets.
    pub batching: BatchingConfig,
}

/// Errors in the router's own configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl RouterArgs {
    /// Builds the router config for the given model and shard sockets, checking cross-flag
    /// constraints.
    pub fn into_config(
        self,
        model_id: String,
        tokenizer_path: PathBuf,
        shard_uds_paths: Vec<PathBuf>,
    ) -> Result<RouterConfig, ConfigError> {
        if self.max_input_length >= self.max_total_tokens {
            return Err(ConfigError::Invalid(format!(
                "--max-input-length ({}) must be smaller than --max-total-tokens ({})",
                self.max_input_length, self.max_total_tokens
            )));
        }
        if self.max_batch_prefill_tokens < self.max_input_length {
            return Err(ConfigError::Invalid(format!(
                "--max-batch-prefill-tokens ({}) must be at least --max-input-length ({})",
                self.max_batch_prefill_tokens, self.max_input_length
            )));
        }
        if let Some(total) = self.max_batch_total_tokens
            && total < self.max_total_tokens
        {
            return Err(ConfigError::Invalid(format!(
                "--max-batch-total-tokens ({total}) must be at least --max-total-tokens ({})",
                self.max_total_tokens
            )));
        }
        if self.max_concurrent_requests == 0 || self.validation_workers == 0 {
            return Err(ConfigError::Invalid(
                "--max-concurrent-requests and --validation-workers must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.waiting_served_ratio) {
            return Err(ConfigError::Invalid(
                "--waiting-served-ratio must be in [0, 1]".into(),
            ));
        }
        let ip: std::net::IpAddr = self
            .hostname
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("--hostname {}: {e}", self.hostname)))?;
        Ok(RouterConfig {
            http_addr: SocketAddr::new(ip, self.port),
            grpc_addr: SocketAddr::new(ip, self.grpc_port),
            model_id,
            tokenizer_path,
            shard_uds_paths,
            limits: Limits {
                max_concurrent_requests: self.max_concurrent_requests,
                max_input_length: self.max_input_length,
                max_total_tokens: self.max_total_tokens,
                max_stop_sequences: self.max_stop_sequences,
                max_top_n_tokens: self.max_top_n_tokens,
                default_max_new_tokens: self.default_max_new_tokens,
                validation_workers: self.validation_workers,
            },
            batching: BatchingConfig {
                max_batch_prefill_tokens: self.max_batch_prefill_tokens,
                max_batch_total_tokens: self.max_batch_total_tokens,
                max_batch_size: self.max_batch_size,
                waiting_served_ratio: self.waiting_served_ratio,
                max_waiting_tokens: self.max_waiting_tokens,
            },
        })
    }
}
