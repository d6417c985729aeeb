//! An OpenAI request turned into the LoRAX [`GenerateRequest`]s of its choices: one per prompt
//! and per `n`, each with its own seed, all sharing the parameters the shared validation checks.
//!
//! | OpenAI | LoRAX parameter |
//! |---|---|
//! | `max_tokens`, `max_completion_tokens` | `max_new_tokens` |
//! | `temperature` (0 = greedy; sampling otherwise, also by default) | `temperature`, `do_sample` |
//! | `top_p`, `presence_penalty`, `frequency_penalty`, `stop` | the same |
//! | `seed` | `seed` + choice index |
//! | `logprobs` / `top_logprobs` (alternatives) | `return_k_alternatives` |
//! | `best_of`, `response_format` (other than text) | the same (refused there when > 1 / set) |
//! | `model`, `adapter_id`, `adapter_source`, `merged_adapters`, `api_token` | see [`super::model`] |

use super::error::OpenAiError;
use super::model::{self, ModelTarget};
use super::types::{AdapterFields, CommonFields};
use crate::http::AppState;
use crate::infer::{GenerateParameters, GenerateRequest};

/// The route a plan answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

impl Endpoint {
    /// The route's parameter for the alternatives per token.
    pub fn logprobs_param(self) -> &'static str {
        match self {
            Self::Completions => "logprobs",
            Self::Chat => "top_logprobs",
        }
    }
}

/// What differs between the routes before planning.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteInput {
    /// The route.
    pub endpoint: Endpoint,
    /// The prompts (the rendered conversation for chat).
    pub prompts: Vec<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Alternatives per token when logprobs are asked (`None`: no logprobs).
    pub logprobs: Option<u32>,
    /// `best_of` (completions).
    pub best_of: Option<i64>,
    /// Let the tokenizer add BOS (false for rendered chat templates, which carry it).
    pub add_special_tokens: bool,
}

/// Everything needed to run and answer one OpenAI request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The route.
    pub endpoint: Endpoint,
    /// The `model` echoed in responses.
    pub model: String,
    /// What `model` named.
    pub target: ModelTarget,
    /// One request per choice, in choice order.
    pub requests: Vec<GenerateRequest>,
    /// For each choice, whether its prompt tokens count in `usage` (the first choice of each
    /// prompt: OpenAI counts a prompt once however many choices it has).
    pub counts_prompt: Vec<bool>,
    /// See [`RouteInput::add_special_tokens`].
    pub add_special_tokens: bool,
    /// Stop sequences, cut from the returned text.
    pub stop: Vec<String>,
    /// See [`RouteInput::logprobs`].
    pub logprobs: Option<u32>,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Stream a last chunk with `usage`.
    pub include_usage: bool,
}

/// `response_format` as LoRAX validation sees it: `{"type": "text"}` is the default, anything
/// else is passed on (and refused there).
fn response_format(format: Option<serde_json::Value>) -> Option<serde_json::Value> {
    format.filter(|f| !f.is_null() && f.get("type").and_then(|t| t.as_str()) != Some("text"))
}

/// `n`, checked: at least 1, and all choices must fit the concurrency limit.
fn choices_per_prompt(n: Option<i64>, prompts: usize, limit: usize) -> Result<u32, OpenAiError> {
    let n = n.unwrap_or(1);
    if n < 1 {
        return Err(OpenAiError::invalid(
            "n",
            format!("`n` must be >= 1. Given: {n}"),
        ));
    }
    let total = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .saturating_mul(prompts);
    if total > limit {
        return Err(OpenAiError::invalid(
            "n",
            format!(
                "`n` times the number of prompts must be <= {limit} (--max-concurrent-requests). Given: {total}"
            ),
        ));
    }
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

impl Plan {
    /// Plans a request of `state`'s server.
    pub fn new(
        state: &AppState,
        common: CommonFields,
        adapter: AdapterFields,
        input: RouteInput,
    ) -> Result<Self, OpenAiError> {
        let limit = state.config.limits.max_concurrent_requests;
        let n = choices_per_prompt(common.n, input.prompts.len(), limit)?;
        let max_alternatives = state.config.limits.max_top_n_tokens;
        if let Some(k) = input.logprobs.filter(|&k| k > max_alternatives) {
            let name = input.endpoint.logprobs_param();
            return Err(OpenAiError::invalid(
                name,
                format!("`{name}` must be <= {max_alternatives}. Given: {k}"),
            ));
        }
        if common.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(OpenAiError::invalid(
                "logit_bias",
                "`logit_bias` is not supported by this server; omit it",
            ));
        }
        let served = &state.config.model_id;
        let target = model::resolve(common.model.as_deref(), served);
        let adapter = target.apply(adapter)?;
        let stop = common.stop.map(|s| s.into_vec()).unwrap_or_default();
        let parameters = GenerateParameters {
            adapter_id: adapter.adapter_id,
            adapter_source: adapter.adapter_source,
            merged_adapters: adapter.merged_adapters,
            api_token: adapter.api_token,
            do_sample: Some(true),
            max_new_tokens: input.max_tokens,
            temperature: common.temperature,
            top_p: common.top_p,
            presence_penalty: common.presence_penalty,
            frequency_penalty: common.frequency_penalty,
            stop: Some(stop.clone()),
            best_of: input.best_of,
            return_k_alternatives: input.logprobs.filter(|&k| k > 0).map(i64::from),
            response_format: response_format(common.response_format),
            ..Default::default()
        };
        let mut requests = Vec::new();
        let mut counts_prompt = Vec::new();
        for prompt in &input.prompts {
            for i in 0..n {
                let index = requests.len() as u64;
                let mut parameters = parameters.clone();
                parameters.seed = common.seed.map(|s| s.wrapping_add(index));
                requests.push(GenerateRequest {
                    inputs: prompt.clone(),
                    parameters,
                });
                counts_prompt.push(i == 0);
            }
        }
        let include_usage = common
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Self {
            endpoint: input.endpoint,
            model: common.model.unwrap_or_else(|| served.clone()),
            target,
            requests,
            counts_prompt,
            add_special_tokens: input.add_special_tokens,
            stop,
            logprobs: input.logprobs,
            stream: common.stream.unwrap_or(false),
            include_usage,
        })
    }
}

/// The alternatives a `logprobs`/`top_logprobs` count asks for, checked to be >= 0 (the upper
/// bound is the server's `--max-top-n-tokens`, checked by validation).
pub fn logprob_count(param: &'static str, value: i64) -> Result<u32, OpenAiError> {
    u32::try_from(value)
        .map_err(|_| OpenAiError::invalid(param, format!("`{param}` must be >= 0. Given: {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_is_checked() {
        assert_eq!(choices_per_prompt(None, 1, 8).ok(), Some(1));
        assert_eq!(choices_per_prompt(Some(4), 2, 8).ok(), Some(4));
        assert!(choices_per_prompt(Some(0), 1, 8).is_err());
        assert!(choices_per_prompt(Some(-1), 1, 8).is_err());
        assert!(choices_per_prompt(Some(5), 2, 8).is_err());
        assert!(choices_per_prompt(Some(i64::MAX), 1, 8).is_err());
    }

    #[test]
    fn text_response_format_is_the_default() {
        use serde_json::json;
        assert_eq!(response_format(Some(json!({"type": "text"}))), None);
        assert_eq!(response_format(Some(json!(null))), None);
        let schema = json!({"type": "json_object"});
        assert_eq!(response_format(Some(schema.clone())), Some(schema));
        assert!(logprob_count("logprobs", -1).is_err());
        assert_eq!(logprob_count("logprobs", 3).ok(), Some(3));
    }
}
