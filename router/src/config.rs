//! Router configuration: clap arguments (every flag also read from an environment variable) and
//! the plain config structs the rest of the router receives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use medley_proto::step::StepBudget;
pub use medley_spec::AdapterPolicy;
use medley_spec::{AdapterSource, Semantics};

use crate::access::{AccessArgs, AccessConfig};
use crate::merges::NamedMerges;

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
    /// Maximum number of prompt tokens [default: min(1024, max total tokens - 1)].
    #[arg(long, env = "MAX_INPUT_LENGTH")]
    pub max_input_length: Option<u32>,
    /// Maximum prompt + generated tokens of one request [default: min(2048, the model's
    /// `max_position_embeddings`)].
    #[arg(long, env = "MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<u32>,
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
    /// Prompt tokens the shards compute per forward step while requests decode in it; a
    /// longer prompt is prefilled over several steps while running requests keep decoding. May
    /// be smaller than --max-input-length. Default: 32 on CPU shards (there a step's cost grows
    /// with its rows, prompt or decode alike, so a 32-token chunk keeps the step that carries
    /// it within about 3 decode steps of 16 streams), 2048 on GPU shards (a step's cost is
    /// nearly flat up to thousands of tokens there). With more running requests a step may
    /// carry two prompt tokens per request (up to --max-idle-prefill-tokens), so admission
    /// keeps up with many streams.
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS")]
    pub max_batch_prefill_tokens: Option<u32>,
    /// Prompt tokens of a step in which no request decodes (nobody's stream waits on it), so a
    /// lone prompt is prefilled in larger chunks; never less than --max-batch-prefill-tokens.
    /// Default 512: about where prompt throughput on a CPU levels off.
    #[arg(long, env = "MAX_IDLE_PREFILL_TOKENS")]
    pub max_idle_prefill_tokens: Option<u32>,
    /// Maximum tokens (prompt + max new) of all running requests; defaults to what the shards'
    /// KV cache holds after warmup. A larger value over-commits the KV cache: when it runs out,
    /// the shards preempt requests and recompute them later.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<u32>,
    /// Maximum requests in one batch.
    #[arg(long, env = "MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Add waiting requests to a running batch only when at least this fraction of the batch
    /// size is waiting (unless they waited `max_waiting_tokens` steps). 0 (the default) admits
    /// a waiting request at the next step: prompts are prefilled in chunks of at most
    /// `--max-batch-prefill-tokens` per step, so a lone newcomer costs the running streams one
    /// bounded step, and holding it back (TGI's 1.2, meant for unbounded prefills) would only
    /// add to its time to first token.
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 0.0)]
    pub waiting_served_ratio: f32,
    /// Decode steps a waiting request may be held back before it is forced into the batch.
    #[arg(long, env = "MAX_WAITING_TOKENS", default_value_t = 20)]
    pub max_waiting_tokens: usize,
    /// Most adapters one `merged_adapters` may list.
    #[arg(long, env = "MAX_MERGE_ADAPTERS", default_value_t = 8)]
    pub max_merge_adapters: usize,
    /// Most distinct adapters (merges included, the base model not) in the running batch.
    #[arg(long, env = "MAX_ACTIVE_ADAPTERS", default_value_t = 128)]
    pub max_active_adapters: usize,
    /// Seconds an adapter may stay active before it yields to adapters that are waiting for a
    /// slot or a place in the batch.
    #[arg(long, env = "ADAPTER_CYCLE_TIME", default_value_t = 2.0)]
    pub adapter_cycle_time: f64,
    /// Math of per-request merges: `peft` (PEFT `add_weighted_adapter`) or `lorax`.
    #[arg(long, env = "MERGE_SEMANTICS", default_value = "peft")]
    pub merge_semantics: Semantics,
    /// Directory that adapters with `adapter_source: local` may come from (repeat the flag or
    /// separate with commas); without one, local adapters are refused.
    #[arg(long = "adapter-root", env = "ADAPTER_ROOTS", value_delimiter = ',')]
    pub adapter_roots: Vec<PathBuf>,
    /// Source of adapters whose request names none: `hub`, `local` or `s3`.
    #[arg(long, env = "DEFAULT_ADAPTER_SOURCE", default_value = "hub")]
    pub default_adapter_source: AdapterSource,
    /// API keys, the metrics route and the request size limit.
    #[command(flatten)]
    pub access: AccessArgs,
    /// Optional TLS on both listeners.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Adapters to load (and pin) at start-up.
    #[command(flatten)]
    pub preload: crate::preload::PreloadArgs,
    /// Named merges to register at start-up: a JSON or YAML file holding a list of
    /// `{name, merged_adapters, adapter_source?}` (or `{merges: [...]}`).
    #[arg(long, env = "MERGES_FILE")]
    pub merges: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,
    /// OpenTelemetry collector to export request traces to, over OTLP/gRPC (e.g.
    /// `http://collector:4317`); `medley serve` passes it to the shards too. Without it no
    /// tracing exporter is installed. Clients' W3C `traceparent` headers (HTTP) and metadata
    /// (gRPC) are continued.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the router's spans; the shards of `medley serve` use `medley-shard`
    /// (or `<name>-shard` for another name).
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "medley-router")]
    pub otlp_service_name: String,
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
    /// Adapter and merge rules.
    pub adapters: AdapterPolicy,
}

/// Continuous-batching budgets.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// See [`RouterArgs::max_batch_prefill_tokens`]; until [`RouterConfig::fit_device`] the
    /// CPU default when the flag is unset.
    pub max_batch_prefill_tokens: u32,
    /// The flag was given (the device does not choose the default).
    pub max_batch_prefill_tokens_set: bool,
    /// See [`RouterArgs::max_idle_prefill_tokens`] (as given; [`Self::idle_prefill_tokens`]
    /// resolves it).
    pub max_idle_prefill_tokens: Option<u32>,
    /// See [`RouterArgs::max_batch_total_tokens`].
    pub max_batch_total_tokens: Option<u32>,
    /// See [`RouterArgs::max_batch_size`].
    pub max_batch_size: Option<usize>,
    /// See [`RouterArgs::waiting_served_ratio`].
    pub waiting_served_ratio: f32,
    /// See [`RouterArgs::max_waiting_tokens`].
    pub max_waiting_tokens: usize,
    /// See [`RouterArgs::max_active_adapters`].
    pub max_active_adapters: usize,
    /// See [`RouterArgs::adapter_cycle_time`].
    pub adapter_cycle_time: Duration,
}

impl BatchingConfig {
    /// Prompt tokens of a step in which no request decodes: `--max-idle-prefill-tokens` (else
    /// its default), never less than the per-step budget.
    pub fn idle_prefill_tokens(&self) -> u32 {
        self.max_idle_prefill_tokens
            .unwrap_or(DEFAULT_MAX_IDLE_PREFILL_TOKENS)
            .max(self.max_batch_prefill_tokens)
    }

    /// The shards' per-step prompt budget: `--max-batch-prefill-tokens` while requests run
    /// (more with many of them, see [`StepBudget::prompt_tokens`]), the idle budget when none does.
    pub fn step_budget(&self) -> StepBudget {
        StepBudget::new(self.max_batch_prefill_tokens, self.idle_prefill_tokens())
    }
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
    /// Named merges (from `--merges`; more can be registered at run time).
    pub merges: NamedMerges,
    /// API keys and request limits.
    pub access: AccessConfig,
    /// TLS on both listeners (`None`: plaintext).
    pub tls: Option<crate::tls::TlsConfig>,
    /// Adapters loaded before the router listens (pinned ones first).
    pub preload: Vec<crate::preload::PreloadEntry>,
    /// Path of the model's `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// Unix socket of each shard, rank 0 first.
    pub shard_uds_paths: Vec<PathBuf>,
    /// Validation limits.
    pub limits: Limits,
    /// `--max-input-length` and `--max-total-tokens` as given: the limits they leave open
    /// follow the model ([`RouterConfig::fit_model`]).
    pub token_flags: TokenFlags,
    /// Batching budgets.
    pub batching: BatchingConfig,
}

/// The token-limit flags as given (`None`: follow the model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenFlags {
    /// `--max-input-length`.
    pub max_input_length: Option<u32>,
    /// `--max-total-tokens`.
    pub max_total_tokens: Option<u32>,
}

impl TokenFlags {
    /// `(max_input_length, max_total_tokens)`: the flags when given, else defaults that fit
    /// the model's positions (`model_positions`, when known).
    pub fn resolve(self, model_positions: Option<u32>) -> (u32, u32) {
        let total = self.max_total_tokens.unwrap_or_else(|| {
            model_positions.map_or(DEFAULT_MAX_TOTAL_TOKENS, |p| {
                p.min(DEFAULT_MAX_TOTAL_TOKENS)
            })
        });
        let input = self
            .max_input_length
            .unwrap_or_else(|| DEFAULT_MAX_INPUT_LENGTH.min(total.saturating_sub(1)));
        (input, total)
    }
}

/// Errors in the router's own configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Default of `--max-total-tokens` when the model allows it.
pub const DEFAULT_MAX_TOTAL_TOKENS: u32 = 2048;
/// Default of `--max-input-length` when `--max-total-tokens` allows it.
pub const DEFAULT_MAX_INPUT_LENGTH: u32 = 1024;
/// Default of `--max-batch-prefill-tokens` on CPU shards: prompt tokens per forward step.
pub const DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU: u32 = 32;
/// Default of `--max-idle-prefill-tokens` (raised to `--max-batch-prefill-tokens` if below).
pub const DEFAULT_MAX_IDLE_PREFILL_TOKENS: u32 = 512;
/// Default of `--max-batch-prefill-tokens` on GPU shards.
pub const DEFAULT_MAX_BATCH_PREFILL_TOKENS_GPU: u32 = 2048;

impl RouterArgs {
    /// `--max-batch-prefill-tokens`, else the CPU default.
    fn prefill_tokens(&self) -> u32 {
        self.max_batch_prefill_tokens
            .unwrap_or(DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU)
    }

    /// The token-limit flags as given.
    pub fn token_flags(&self) -> TokenFlags {
        TokenFlags {
            max_input_length: self.max_input_length,
            max_total_tokens: self.max_total_tokens,
        }
    }

    /// Builds the router config for the given model and shard sockets, checking cross-flag
    /// constraints. Token limits the flags leave open take their defaults for an unknown model
    /// until [`RouterConfig::fit_model`] learns its positions.
    pub fn into_config(
        self,
        model_id: String,
        tokenizer_path: PathBuf,
        shard_uds_paths: Vec<PathBuf>,
    ) -> Result<RouterConfig, ConfigError> {
        let token_flags = self.token_flags();
        let (max_input_length, max_total_tokens) = token_flags.resolve(None);
        let prefill_tokens = self.prefill_tokens();
        check_token_limits(
            max_input_length,
            max_total_tokens,
            prefill_tokens,
            self.max_batch_total_tokens,
        )?;
        if self.max_idle_prefill_tokens == Some(0) {
            return Err(ConfigError::Invalid(
                "--max-idle-prefill-tokens must be positive".into(),
            ));
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
        if self.max_merge_adapters == 0 || self.max_active_adapters == 0 {
            return Err(ConfigError::Invalid(
                "--max-merge-adapters and --max-active-adapters must be positive".into(),
            ));
        }
        let adapter_cycle_time =
            Duration::try_from_secs_f64(self.adapter_cycle_time).map_err(|_| {
                ConfigError::Invalid(format!(
                    "--adapter-cycle-time must be a non-negative number of seconds. Given: {}",
                    self.adapter_cycle_time
                ))
            })?;
        let adapter_roots = self
            .adapter_roots
            .iter()
            .filter(|r| !r.as_os_str().is_empty())
            .map(|r| {
                std::path::absolute(r).map_err(|e| {
                    ConfigError::Invalid(format!("--adapter-root {}: {e}", r.display()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = AdapterPolicy {
            max_merge_adapters: self.max_merge_adapters,
            adapter_roots,
            default_source: self.default_adapter_source,
            merge_semantics: self.merge_semantics,
            served_model_id: model_id.clone(),
        };
        let merges = match &self.merges {
            Some(path) => crate::merges::load_file(path, &policy)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            None => NamedMerges::default(),
        };
        let access = self.access.into_config()?;
        let tls = self.tls.into_config()?;
        let preload = self.preload.into_entries()?;
        let ip: std::net::IpAddr = self
            .hostname
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("--hostname {}: {e}", self.hostname)))?;
        Ok(RouterConfig {
            http_addr: SocketAddr::new(ip, self.port),
            grpc_addr: SocketAddr::new(ip, self.grpc_port),
            model_id,
            merges,
            access,
            tls,
            preload,
            tokenizer_path,
            shard_uds_paths,
            token_flags,
            limits: Limits {
                max_concurrent_requests: self.max_concurrent_requests,
                max_input_length,
                max_total_tokens,
                max_stop_sequences: self.max_stop_sequences,
                max_top_n_tokens: self.max_top_n_tokens,
                default_max_new_tokens: self.default_max_new_tokens,
                validation_workers: self.validation_workers,
                adapters: policy,
            },
            batching: BatchingConfig {
                max_batch_prefill_tokens: prefill_tokens,
                max_batch_prefill_tokens_set: self.max_batch_prefill_tokens.is_some(),
                max_idle_prefill_tokens: self.max_idle_prefill_tokens,
                max_batch_total_tokens: self.max_batch_total_tokens,
                max_batch_size: self.max_batch_size,
                waiting_served_ratio: self.waiting_served_ratio,
                max_waiting_tokens: self.max_waiting_tokens,
                max_active_adapters: self.max_active_adapters,
                adapter_cycle_time,
            },
        })
    }
}

impl RouterConfig {
    /// Sets the token limits the flags left open to the defaults for a model with
    /// `model_positions` positions (what the shards report), and checks them again.
    pub fn fit_model(&mut self, model_positions: u32) -> Result<(), ConfigError> {
        let (input, total) = self.token_flags.resolve(Some(model_positions));
        check_token_limits(
            input,
            total,
            self.batching.max_batch_prefill_tokens,
            self.batching.max_batch_total_tokens,
        )?;
        self.limits.max_input_length = input;
        self.limits.max_total_tokens = total;
        Ok(())
    }

    /// Sets the per-step prompt budget for the shards' device (`device_type` from `Info`:
    /// `cpu` or `cuda`) unless the flag gave one.
    pub fn fit_device(&mut self, device_type: &str) {
        if !self.batching.max_batch_prefill_tokens_set {
            self.batching.max_batch_prefill_tokens = match device_type {
                "cpu" => DEFAULT_MAX_BATCH_PREFILL_TOKENS_CPU,
                _ => DEFAULT_MAX_BATCH_PREFILL_TOKENS_GPU,
            };
        }
    }
}

/// The rules between the token limits and the batch budgets.
fn check_token_limits(
    max_input_length: u32,
    max_total_tokens: u32,
    max_batch_prefill_tokens: u32,
    max_batch_total_tokens: Option<u32>,
) -> Result<(), ConfigError> {
    if max_input_length == 0 || max_input_length >= max_total_tokens {
        return Err(ConfigError::Invalid(format!(
            "--max-input-length ({max_input_length}) must be positive and smaller than --max-total-tokens ({max_total_tokens})"
        )));
    }
    // Longer prompts are prefilled over several steps: only an empty step budget is refused.
    if max_batch_prefill_tokens == 0 {
        return Err(ConfigError::Invalid(
            "--max-batch-prefill-tokens must be positive".into(),
        ));
    }
    if let Some(total) = max_batch_total_tokens
        && total < max_total_tokens
    {
        return Err(ConfigError::Invalid(format!(
            "--max-batch-total-tokens ({total}) must be at least --max-total-tokens ({max_total_tokens})"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
