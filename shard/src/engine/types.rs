//! What the engine takes and returns: plain Rust types, free of the wire format. The server
//! (`crate::server`) converts them from and to the `medley.shard.v1` messages.

pub use crate::adapters::AdapterSlotInfo;
pub use crate::generation::{FinishReason, SamplingParams, StopParams};

/// One request of a new batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Router-assigned request id (also the KV-cache key).
    pub id: u64,
    /// Prompt token ids, already truncated by the router.
    pub input_ids: Vec<u32>,
    /// How each next token is chosen (range-checked when the sequence is built).
    pub sampling: SamplingParams,
    /// When the sequence stops.
    pub stopping: StopParams,
    /// Return the logprob of every prompt token at prefill.
    pub prefill_logprobs: bool,
    /// Number of most likely alternatives to return with every generated token.
    pub top_n_tokens: u32,
    /// Adapter slot; 0 is the base model.
    pub adapter_slot: u32,
}

/// A new batch of requests to prefill.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Router-assigned batch id; the cached batch keeps it.
    pub id: u64,
    /// The requests, in the router's order.
    pub requests: Vec<Request>,
    /// Tokens the batch may hold in the KV cache (prompt + max new tokens of every request),
    /// as the router planned it.
    pub max_tokens: u32,
}

/// Handle to a batch whose KV state lives in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBatch {
    /// The batch id.
    pub id: u64,
    /// Ids of the requests still running in it.
    pub request_ids: Vec<u64>,
    /// Number of requests.
    pub size: u32,
    /// Tokens reserved in the KV cache for it (prompt + max new tokens of every request,
    /// capped at the model's positions).
    pub max_tokens: u32,
    /// Tokens currently held in the KV cache for it.
    pub current_tokens: u32,
    /// Tokens still to compute before its requests decode: the rest of prompts being
    /// prefilled in chunks, and whole sequences preempted for recomputation.
    pub pending_tokens: u32,
    /// Requests preempted (their KV blocks freed) waiting to be recomputed.
    pub preempted: u32,
    /// Requests waiting in the router's queues (set by the router on the batches it sends;
    /// the step's prompt budget counts them); 0 in the shards' answers.
    pub queued: u32,
    /// Requests waiting for their first token (prompts being prefilled), preempted ones aside.
    pub prefilling: u32,
}

/// Tokens with their logprobs and texts, as parallel vectors of equal length.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tokens {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Natural-log probability of each token (NaN where there is none).
    pub logprobs: Vec<f32>,
    /// Text of each token.
    pub texts: Vec<String>,
    /// Whether each token is special (BOS, EOS, ...).
    pub is_special: Vec<bool>,
}

/// The outcome of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedText {
    /// The whole generated text, special tokens skipped.
    pub text: String,
    /// Number of generated tokens.
    pub generated_tokens: u32,
    /// Why the request finished.
    pub finish_reason: FinishReason,
    /// Seed of the random stream, for sampled (not greedy) requests.
    pub seed: Option<u64>,
}

/// What one step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The request.
    pub request_id: u64,
    /// Prompt tokens with logprobs, only on the prefill step of requests that asked for them.
    pub prefill_tokens: Option<Tokens>,
    /// The token generated at this step.
    pub tokens: Tokens,
    /// Set when the request finished at this step.
    pub generated_text: Option<GeneratedText>,
    /// Top-n alternatives for each token in `tokens` (empty when none were asked for).
    pub top_tokens: Vec<Tokens>,
    /// With the first generated token: prompt tokens whose keys and values came from the
    /// prefix cache.
    pub cached_tokens: Option<u32>,
}

/// Where the time of one step went, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTimings {
    /// The forward pass.
    pub forward_ns: u64,
    /// The part of the forward pass spent in collectives (0 without tensor parallelism).
    pub comm_ns: u64,
    /// The part of the forward pass until the model returned, before the logits were read
    /// back: on a GPU, the host's time to queue the step.
    pub launch_ns: u64,
    /// Sampling, stopping criteria and detokenization.
    pub decode_ns: u64,
    /// The whole step.
    pub total_ns: u64,
}

/// The result of a prefill or decode step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResponse {
    /// One generation per request of the step, in batch order.
    pub generations: Vec<Generation>,
    /// The requests still running; `None` when every request finished.
    pub batch: Option<CachedBatch>,
    /// Time spent.
    pub timings: StepTimings,
    /// The KV pool after the step.
    pub kv: crate::kv_cache::KvStats,
}

/// Shape of the worst-case prefill run by [`super::Engine::warmup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WarmupParams {
    /// Longest prompt of one request (clamped to the model's positions).
    pub max_input_tokens: u32,
    /// Prompt tokens of one step while sequences decode in it.
    pub max_prefill_tokens: u32,
    /// Prompt tokens of a step in which no sequence decodes; at least `max_prefill_tokens`
    /// (0 means `max_prefill_tokens`). The warm-up runs a step of this many tokens, split into
    /// requests of at most `max_input_tokens`.
    pub max_idle_prefill_tokens: u32,
    /// Longest request (prompt and generated tokens): a KV cache sized from the GPU's memory
    /// ([`KvSizing::GpuMemory`]) must hold at least one.
    pub max_total_tokens: u32,
}

/// How a shard's KV cache is sized.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum KvSizing {
    /// As allocated at load (`--kv-cache-tokens`, `--kv-cache-bytes`, or the CPU's 2 GiB).
    #[default]
    Fixed,
    /// At the warm-up, from the GPU's memory: what the weights, the warm-up step and the
    /// adapter budget leave of `utilization` of the GPU (the share the shard may fill,
    /// `--gpu-memory-utilization`), within what is free (see `engine::memory`).
    GpuMemory {
        /// Share of the device's memory to fill, in (0, 1].
        utilization: f64,
    },
}

/// What a warm-up found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupResult {
    /// Tokens the KV cache can hold in total, over all running requests.
    pub max_supported_total_tokens: u64,
}

/// Static facts about the shard and its model, reported by `Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Model name for logs and `/info`.
    pub model_id: String,
    /// The torch-style dtype name (see [`super::dtype_name`]).
    pub dtype: &'static str,
    /// `cpu` or `cuda`.
    pub device_type: &'static str,
    /// This shard's rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Vocabulary size of the model.
    pub vocab_size: u32,
    /// Longest sequence the model can attend over.
    pub max_position_embeddings: u32,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Tokens the KV cache can hold in total (as configured, or as the warm-up sized it from
    /// the GPU's memory).
    pub kv_cache_tokens: u64,
    /// Bytes of adapter weights the shard may hold in its slots.
    pub adapter_memory_bytes: u64,
    /// Number of adapter slots (slot 0, the base model, excluded).
    pub max_adapter_slots: u32,
    /// Tokens per KV-cache block.
    pub kv_block_tokens: u32,
}
