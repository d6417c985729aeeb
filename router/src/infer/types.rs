//! Types shared by the fronts (HTTP, gRPC), the [`super::Infer`] facade and the backend.

use std::time::Instant;

use super::AdapterSpec;

/// Sampling parameters after validation (defaults resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParameters {
    /// Softmax temperature (1.0 = unchanged).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = disabled).
    pub top_k: u32,
    /// Nucleus sampling mass (1.0 = disabled).
    pub top_p: f32,
    /// Typical sampling mass (1.0 = disabled).
    pub typical_p: f32,
    /// Sample instead of taking the argmax.
    pub do_sample: bool,
    /// Seed of the sampler (always set: random when the client gave none).
    pub seed: u64,
    /// Repetition penalty (1.0 = disabled).
    pub repetition_penalty: f32,
    /// OpenAI-style frequency penalty (0.0 = disabled).
    pub frequency_penalty: f32,
    /// OpenAI-style presence penalty (0.0 = disabled).
    pub presence_penalty: f32,
}

/// Stopping criteria after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidStoppingParameters {
    /// Maximum number of generated tokens (> 0).
    pub max_new_tokens: u32,
    /// Stop sequences, matched on the decoded text.
    pub stop_sequences: Vec<String>,
    /// Keep generating after an EOS token.
    pub ignore_eos_token: bool,
}

/// A request that passed validation: tokenized, truncated, with every default resolved.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    /// The prompt text as received (for logs and `return_full_text`).
    pub inputs: String,
    /// Prompt token ids after truncation.
    pub input_ids: Vec<u32>,
    /// Sampling parameters.
    pub parameters: ValidParameters,
    /// Stopping criteria.
    pub stopping_parameters: ValidStoppingParameters,
    /// Return the prompt tokens with their logprobs.
    pub decoder_input_details: bool,
    /// Alternatives to return per generated token (0 = none).
    pub top_n_tokens: u32,
    /// Which weights to use.
    pub adapter: AdapterSpec,
}

impl ValidGenerateRequest {
    /// Number of prompt tokens.
    pub fn input_length(&self) -> u32 {
        self.input_ids.len() as u32
    }
}

/// One generated (or prompt) token.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// Decoded text of the token.
    pub text: String,
    /// Log-probability under the sampling distribution.
    pub logprob: f32,
    /// True for special tokens (EOS, BOS...).
    pub special: bool,
}

/// A prompt token, as returned with `decoder_input_details`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillToken {
    /// Token id.
    pub id: u32,
    /// Decoded text of the token.
    pub text: String,
    /// Log-probability given the preceding tokens; `None` for the first token.
    pub logprob: Option<f32>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced an end-of-sequence token.
    EosToken,
    /// A stop sequence appeared in the output.
    StopSequence,
}

impl FinishReason {
    /// The LoRAX/TGI wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::EosToken => "eos_token",
            Self::StopSequence => "stop_sequence",
        }
    }
}

/// Final text of a finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Generated text (prompt excluded).
    pub text: String,
    /// Number of generated tokens.
    pub generated_tokens: u32,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Seed used by the sampler, when sampling.
    pub seed: Option<u64>,
}

/// One event of a request's stream, produced by the backend.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// The prompt tokens with logprobs (only when `decoder_input_details` was asked).
    Prefill(Vec<PrefillToken>),
    /// A generated token that is not the last one.
    Intermediate {
        /// The token.
        token: Token,
        /// Most likely alternatives, when asked.
        top_tokens: Vec<Token>,
    },
    /// The last token, with the final text.
    End {
        /// The token.
        token: Token,
        /// Most likely alternatives, when asked.
        top_tokens: Vec<Token>,
        /// Final text and reason.
        generated_text: GeneratedText,
        /// When the request entered the queue.
        queued: Instant,
        /// When its first forward pass started.
        start: Instant,
        /// Prompt tokens whose KV came from the shards' prefix cache (`None`: not reported).
        cached_tokens: Option<u32>,
    },
}
