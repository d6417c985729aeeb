//! Request bodies of `/v1/completions` and `/v1/chat/completions`.
//!
//! Every field is optional where OpenAI's is (JSON `null` and a missing key mean the same
//! thing) and unknown keys are ignored, like the LoRAX routes. Fields whose JSON may take several
//! shapes (`prompt`, message `content`) are kept as JSON and converted with explicit messages.

use serde::Deserialize;
use serde_json::Value;

use super::error::OpenAiError;
use crate::infer::MergedAdapters;

/// Medley's LoRAX adapter fields, accepted on the OpenAI routes too (same JSON, same validation
/// as `parameters` of `/generate`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct AdapterFields {
    /// Single adapter to apply.
    pub adapter_id: Option<String>,
    /// `hub`, `local` or `s3` (default: `--default-adapter-source`).
    pub adapter_source: Option<String>,
    /// A per-request merge of several adapters.
    pub merged_adapters: Option<MergedAdapters>,
    /// Token for private hub adapters. (The `Authorization` header of OpenAI clients carries
    /// their API key, so it is not used as a hub token on these routes.)
    pub api_token: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The sampling and response fields both routes share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CommonFields {
    /// The base model id or an adapter id (missing: the base model).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Softmax temperature; 0 is greedy. Sampling is on by default, as with OpenAI.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Choices to generate (default 1).
    pub n: Option<i64>,
    /// Sampling seed; choice `i` uses `seed + i`.
    pub seed: Option<u64>,
    /// Stop sequences (not included in the returned text).
    pub stop: Option<Stop>,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id (ignored).
    pub user: Option<Value>,
    /// Token biases (only an empty map is accepted).
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Structured output (only `{"type": "text"}` is accepted).
    pub response_format: Option<Value>,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    /// A string, or a list of strings (one choice group per prompt).
    pub prompt: Value,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// Adapter fields.
    #[serde(flatten)]
    pub adapter: AdapterFields,
    /// Return the logprobs of the chosen tokens and this many alternatives per token.
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text (only false is accepted).
    pub echo: Option<bool>,
    /// Text after the completion (not supported).
    pub suffix: Option<String>,
    /// Generate several and return the best (only 1 is accepted).
    pub best_of: Option<i64>,
}

impl CompletionRequest {
    /// The prompts: a string, or a non-empty list of strings.
    pub fn prompts(&self) -> Result<Vec<String>, OpenAiError> {
        let bad = || {
            OpenAiError::invalid(
                "prompt",
                "`prompt` must be a string or a list of strings (token-id prompts are not supported)",
            )
        };
        match &self.prompt {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .map(|p| p.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`...
    pub role: String,
    /// A string, or a list of `{"type": "text", "text"}` parts.
    #[serde(default)]
    pub content: Value,
    /// The participant's name.
    #[serde(default)]
    pub name: Option<String>,
}

impl ChatMessage {
    /// The text of the message: the string, or its text parts joined with newlines (as vLLM
    /// does); `null` content is empty. Other part types are refused.
    pub fn text(&self) -> Result<String, OpenAiError> {
        match &self.content {
            Value::Null => Ok(String::new()),
            Value::String(s) => Ok(s.clone()),
            Value::Array(parts) => parts
                .iter()
                .map(part_text)
                .collect::<Result<Vec<_>, _>>()
                .map(|texts| texts.join("\n")),
            _ => Err(OpenAiError::invalid(
                "messages",
                "message `content` must be a string or a list of content parts",
            )),
        }
    }
}

/// The text of one content part.
fn part_text(part: &Value) -> Result<&str, OpenAiError> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part.get("text").and_then(Value::as_str).ok_or_else(|| {
            OpenAiError::invalid("messages", "a `text` content part needs a string `text`")
        }),
        Some(other) => Err(OpenAiError::invalid(
            "messages",
            format!("content parts of type `{other}` are not supported; only `text` parts are"),
        )),
        None => Err(OpenAiError::invalid(
            "messages",
            "each content part needs a `type`",
        )),
    }
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// Adapter fields.
    #[serde(flatten)]
    pub adapter: AdapterFields,
    /// Newer name of `max_tokens` (wins when both are given).
    pub max_completion_tokens: Option<i64>,
    /// Return the logprobs of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token (needs `logprobs: true`).
    pub top_logprobs: Option<i64>,
    /// Tool definitions (only none or an empty list is accepted).
    pub tools: Option<Vec<Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_and_contents_take_their_documented_shapes() {
        let r = |v: Value| CompletionRequest {
            prompt: v,
            ..Default::default()
        };
        assert_eq!(r(Value::from("a")).prompts().ok(), Some(vec!["a".into()]));
        assert_eq!(
            r(serde_json::json!(["a", "b"])).prompts().ok(),
            Some(vec!["a".into(), "b".into()])
        );
        for bad in [
            serde_json::json!([]),
            serde_json::json!([1, 2]),
            Value::Null,
            serde_json::json!({"x": 1}),
        ] {
            assert!(r(bad).prompts().is_err());
        }
        let m = |content: Value| ChatMessage {
            role: "user".into(),
            content,
            name: None,
        };
        let parts =
            serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(m(parts).text().ok(), Some("a\nb".into()));
        assert_eq!(m(Value::Null).text().ok(), Some(String::new()));
        let image = serde_json::json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        let e = m(image).text().expect_err("images are refused");
        assert!(e.to_string().contains("image_url"), "{e}");
        assert!(m(serde_json::json!(3)).text().is_err());
    }

    #[test]
    fn flattened_fields_deserialize() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 7,
                "stop": "x", "adapter_id": "a", "merged_adapters": null, "unknown": 1,
                "temperature": 0.5, "max_completion_tokens": 3}"#,
        )
        .expect("valid body");
        assert_eq!(r.common.model.as_deref(), Some("m"));
        assert_eq!(r.common.seed, Some(7));
        assert_eq!(r.common.stop, Some(Stop::One("x".into())));
        assert_eq!(r.common.temperature, Some(0.5));
        assert_eq!(r.adapter.adapter_id.as_deref(), Some("a"));
        assert_eq!(r.max_completion_tokens, Some(3));
    }
}
