//! JSON shapes of the LoRAX/TGI REST API (requests in, responses out).

use serde::{Deserialize, Serialize};

use crate::infer::{
    GenerateOutput, GenerateParameters, GenerateRequest, GeneratedText, PrefillToken,
    ResponseOptions, Token,
};

/// Body of `POST /generate` and `POST /generate_stream`.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerateBody {
    /// The prompt.
    pub inputs: String,
    /// Parameters (null or missing means defaults).
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
}

impl From<GenerateBody> for GenerateRequest {
    fn from(b: GenerateBody) -> Self {
        Self {
            inputs: b.inputs,
            parameters: b.parameters.unwrap_or_default(),
        }
    }
}

/// Body of the LoRAX compat route `POST /` (and `POST /invocations`).
#[derive(Debug, Clone, Deserialize)]
pub struct CompatGenerateBody {
    /// The prompt.
    pub inputs: String,
    /// Parameters (null or missing means defaults).
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
    /// Stream tokens as server-sent events instead of one JSON array.
    #[serde(default)]
    pub stream: Option<bool>,
}

impl CompatGenerateBody {
    /// Splits into the request and the `stream` flag.
    pub fn into_parts(self) -> (GenerateRequest, bool) {
        let stream = self.stream.unwrap_or(false);
        (
            GenerateRequest {
                inputs: self.inputs,
                parameters: self.parameters.unwrap_or_default(),
            },
            stream,
        )
    }
}

/// Body of `POST /tokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeBody {
    /// Text to tokenize.
    pub inputs: String,
    /// Add the model's special tokens (BOS...); default true.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// One alternative of a generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlternativeToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
}

/// A generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenJson {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability.
    pub logprob: f32,
    /// Special token (EOS...).
    pub special: bool,
    /// Most likely alternatives, when `return_k_alternatives` was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative_tokens: Option<Vec<AlternativeToken>>,
    /// LoRAX speculative-decoding flag; always false here.
    pub skipped: bool,
}

impl TokenJson {
    /// Converts a token and its alternatives (kept only when `alternatives`).
    pub fn new(token: Token, top_tokens: Vec<Token>, alternatives: bool) -> Self {
        Self {
            id: token.id,
            text: token.text,
            logprob: token.logprob,
            special: token.special,
            alternative_tokens: alternatives.then(|| {
                top_tokens
                    .into_iter()
                    .map(|t| AlternativeToken {
                        id: t.id,
                        text: t.text,
                        logprob: t.logprob,
                    })
                    .collect()
            }),
            skipped: false,
        }
    }
}

/// A prompt token (`details.prefill`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputToken {
    /// Token id.
    pub id: u32,
    /// Token text.
    pub text: String,
    /// Log-probability; null for the first token.
    pub logprob: Option<f32>,
}

impl From<PrefillToken> for InputToken {
    fn from(t: PrefillToken) -> Self {
        Self {
            id: t.id,
            text: t.text,
            logprob: t.logprob,
        }
    }
}

/// `details` of a non-streamed response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Details {
    /// `length`, `eos_token` or `stop_sequence`.
    pub finish_reason: &'static str,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
    /// LoRAX speculative-decoding count; always 0 here.
    pub skipped_tokens: u32,
    /// Sampling seed (null when greedy).
    pub seed: Option<u64>,
    /// Prompt tokens whose KV came from the shards' prefix cache (absent when not reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// Prompt tokens with logprobs (empty unless `decoder_input_details`).
    pub prefill: Vec<InputToken>,
    /// Generated tokens.
    pub tokens: Vec<TokenJson>,
    /// TGI's form of the alternatives: the most likely tokens at each generated position, when
    /// alternatives were asked (`return_k_alternatives` / `top_n_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<Vec<TokenJson>>>,
}

/// A non-streamed response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateResponse {
    /// Generated text (prompt prepended with `return_full_text`).
    pub generated_text: String,
    /// Per-token details, when `details` was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

impl GenerateResponse {
    /// Shapes a finished generation as the client asked.
    pub fn new(out: GenerateOutput, opts: ResponseOptions) -> Self {
        let top_tokens = (opts.details && opts.alternatives).then(|| {
            out.top_tokens
                .iter()
                .map(|top| {
                    top.iter()
                        .map(|t| TokenJson::new(t.clone(), Vec::new(), false))
                        .collect()
                })
                .collect()
        });
        let details = opts.details.then(|| Details {
            finish_reason: out.generated_text.finish_reason.as_str(),
            prompt_tokens: out.meta.input_length,
            generated_tokens: out.generated_text.generated_tokens,
            skipped_tokens: 0,
            seed: out.generated_text.seed,
            cached_tokens: out.cached_tokens,
            prefill: if opts.decoder_input_details {
                out.prefill.into_iter().map(InputToken::from).collect()
            } else {
                Vec::new()
            },
            tokens: out
                .tokens
                .into_iter()
                .zip(out.top_tokens)
                .map(|(t, top)| TokenJson::new(t, top, opts.alternatives))
                .collect(),
            top_tokens,
        });
        Self {
            generated_text: out.generated_text.text,
            details,
        }
    }
}

/// `details` of the last streamed event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamDetails {
    /// `length`, `eos_token` or `stop_sequence`.
    pub finish_reason: &'static str,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
    /// Sampling seed (null when greedy).
    pub seed: Option<u64>,
    /// Prompt tokens whose KV came from the shards' prefix cache (absent when not reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
}

impl StreamDetails {
    /// Details of a finished generation of `prompt_tokens` prompt tokens, `cached_tokens` of
    /// them from the prefix cache.
    pub fn new(g: &GeneratedText, prompt_tokens: u32, cached_tokens: Option<u32>) -> Self {
        Self {
            finish_reason: g.finish_reason.as_str(),
            prompt_tokens,
            generated_tokens: g.generated_tokens,
            seed: g.seed,
            cached_tokens,
        }
    }
}

/// One server-sent event of a stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamResponse {
    /// The token.
    pub token: TokenJson,
    /// Final text; null except on the last event.
    pub generated_text: Option<String>,
    /// Final details; null except on the last event (and only when `details` was asked).
    pub details: Option<StreamDetails>,
}

/// `GET /info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InfoResponse {
    /// Model name.
    pub model_id: String,
    /// Model revision (unknown here).
    pub model_sha: Option<String>,
    /// Compute dtype.
    pub model_dtype: String,
    /// `cpu` or `cuda`.
    pub model_device_type: String,
    /// Always `text-generation`.
    pub model_pipeline_tag: &'static str,
    /// Requests in flight before 429.
    pub max_concurrent_requests: usize,
    /// Always 1 (`best_of` > 1 is not supported).
    pub max_best_of: u32,
    /// Stop sequences per request.
    pub max_stop_sequences: usize,
    /// Prompt tokens per request.
    pub max_input_length: u32,
    /// Prompt + generated tokens per request.
    pub max_total_tokens: u32,
    /// `max_new_tokens` used when a request gives none (capped by the room left).
    pub max_new_tokens_default: u32,
    /// Alternatives per token.
    pub max_top_n_tokens: u32,
    /// Batching: waiting/running ratio before adding to a running batch.
    pub waiting_served_ratio: f32,
    /// Batching: token capacity of all running requests.
    pub max_batch_total_tokens: u32,
    /// Batching: prompt tokens per forward step (longer prompts are prefilled in chunks).
    pub max_batch_prefill_tokens: u32,
    /// Batching: prompt tokens of a step in which no request decodes.
    pub max_idle_prefill_tokens: u32,
    /// Batching: decode steps a waiting request may be held back.
    pub max_waiting_tokens: usize,
    /// Tokenizer worker threads.
    pub validation_workers: usize,
    /// LoRAX flag; always false.
    pub eager_prefill: bool,
    /// Tensor-parallel shards.
    pub world_size: u32,
    /// Server version.
    pub version: &'static str,
    /// Git revision the server was built from, when known at build time.
    pub sha: Option<&'static str>,
    /// Container label, when known at build time.
    pub docker_label: Option<&'static str>,
    /// LoRAX request logger (not supported): always null.
    pub request_logger_url: Option<String>,
}
