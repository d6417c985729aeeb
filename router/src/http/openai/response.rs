//! Response bodies of the OpenAI routes (whole responses and stream chunks) and the pieces they
//! are built from: the visible text of a choice (stop sequences cut), its `finish_reason`, its
//! logprobs in each route's shape, and `usage`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::plan::Endpoint;
use crate::infer::{FinishReason, Token};

/// `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens (each prompt counted once).
    pub prompt_tokens: u32,
    /// Generated tokens of all choices.
    pub completion_tokens: u32,
    /// The sum.
    pub total_tokens: u32,
    /// What the prompt tokens were made of; absent when the shards report no prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache (counted like `prompt_tokens`).
    pub cached_tokens: u32,
}

impl Usage {
    /// Adds one finished choice: its prompt tokens when its prompt counts, and then the part of
    /// them taken from the prefix cache (`cached_tokens`, when reported).
    pub fn add(
        &mut self,
        prompt_tokens: Option<u32>,
        completion_tokens: u32,
        cached_tokens: Option<u32>,
    ) {
        self.prompt_tokens += prompt_tokens.unwrap_or(0);
        if let (Some(_), Some(cached)) = (prompt_tokens, cached_tokens) {
            self.prompt_tokens_details
                .get_or_insert_default()
                .cached_tokens += cached;
        }
        self.completion_tokens += completion_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

/// One alternative of chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the text.
    pub bytes: Vec<u8>,
}

/// One token of chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the text.
    pub bytes: Vec<u8>,
    /// Most likely alternatives (empty unless `top_logprobs` > 0).
    pub top_logprobs: Vec<TopLogprob>,
}

/// Logprobs in the shape of the route.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// Chat: `{"content": [...]}`.
    Chat {
        /// One entry per token.
        content: Vec<ChatTokenLogprob>,
    },
    /// Completions (legacy shape).
    Completion {
        /// Token texts.
        tokens: Vec<String>,
        /// Their log-probabilities.
        token_logprobs: Vec<f32>,
        /// Per token, alternative text → logprob (null unless `logprobs` > 0).
        top_logprobs: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
        /// Byte offset of each token in the choice's text.
        text_offset: Vec<usize>,
    },
}

impl Logprobs {
    /// Logprobs of `tokens` (with their alternatives; special tokens such as EOS left out),
    /// the first one at byte `offset` of the choice's text.
    pub fn new(
        endpoint: Endpoint,
        tokens: &[(Token, Vec<Token>)],
        alternatives: bool,
        offset: usize,
    ) -> Self {
        let tokens = tokens.iter().filter(|(t, _)| !t.special);
        match endpoint {
            Endpoint::Chat => Self::Chat {
                content: tokens
                    .map(|(t, top)| ChatTokenLogprob {
                        token: t.text.clone(),
                        logprob: t.logprob,
                        bytes: t.text.as_bytes().to_vec(),
                        top_logprobs: top
                            .iter()
                            .map(|a| TopLogprob {
                                token: a.text.clone(),
                                logprob: a.logprob,
                                bytes: a.text.as_bytes().to_vec(),
                            })
                            .collect(),
                    })
                    .collect(),
            },
            Endpoint::Completions => {
                let (mut texts, mut logprobs, mut tops, mut offsets) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let mut at = offset;
                for (t, top) in tokens {
                    offsets.push(at);
                    at += t.text.len();
                    texts.push(t.text.clone());
                    logprobs.push(t.logprob);
                    // Alternatives come best first; two that decode to the same text keep
                    // the better log-probability.
                    let mut alts = serde_json::Map::new();
                    for a in top {
                        alts.entry(a.text.clone())
                            .or_insert_with(|| serde_json::Value::from(a.logprob));
                    }
                    tops.push(alts);
                }
                Self::Completion {
                    tokens: texts,
                    token_logprobs: logprobs,
                    top_logprobs: alternatives.then_some(tops),
                    text_offset: offsets,
                }
            }
        }
    }
}

/// OpenAI's `finish_reason`: `length`, or `stop` for an EOS token or a stop sequence.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// Bytes of `text` a client may see: everything before the first stop sequence; and while the
/// generation is still running (`finished` false), not the longest tail that could still grow
/// into a stop sequence.
pub fn visible_len(text: &str, stops: &[String], finished: bool) -> usize {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return at;
    }
    if finished {
        return text.len();
    }
    let held = stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&k| s.is_char_boundary(k))
                .map(|k| &s[..k])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    text.len() - held
}

/// An assistant message (or the `delta` of a chat chunk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `assistant` (in deltas: only on the first chunk of a choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The text (in deltas: absent when there is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a response or chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Choice {
    /// Completions (whole or chunk).
    Text {
        /// Choice index.
        index: u32,
        /// The text (or the new text of a chunk).
        text: String,
        /// Logprobs, when asked.
        logprobs: Option<Logprobs>,
        /// Set when the choice is finished.
        finish_reason: Option<&'static str>,
    },
    /// A whole chat choice.
    Message {
        /// Choice index.
        index: u32,
        /// The assistant's message.
        message: Message,
        /// Logprobs, when asked.
        logprobs: Option<Logprobs>,
        /// Why it finished.
        finish_reason: Option<&'static str>,
    },
    /// A chat chunk's choice.
    Delta {
        /// Choice index.
        index: u32,
        /// What is new.
        delta: Message,
        /// Logprobs of the new tokens, when asked.
        logprobs: Option<Logprobs>,
        /// Set on the last chunk of the choice.
        finish_reason: Option<&'static str>,
    },
}

/// A response or a stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    /// `cmpl-...` or `chatcmpl-...`, the same for every chunk of a stream.
    pub id: String,
    /// `text_completion`, `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The `model` of the request.
    pub model: String,
    /// The choices.
    pub choices: Vec<Choice>,
    /// Token counts (whole responses; the last chunk with `include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// What the choices of one response share, and how they are shaped.
#[derive(Debug, Clone)]
pub struct Responder {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

impl Responder {
    /// A new response id for `model` on `endpoint`.
    pub fn new(endpoint: Endpoint, model: String) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
        }
    }

    /// The route.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// A choice: the whole text (`chunk` false) or new text of a stream chunk (`chunk` true;
    /// `first` marks a chat choice's first chunk, which carries the role).
    pub fn choice(
        &self,
        index: u32,
        text: String,
        logprobs: Option<Logprobs>,
        finish_reason: Option<&'static str>,
        chunk: Option<bool>,
    ) -> Choice {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => Choice::Text {
                index,
                text,
                logprobs,
                finish_reason,
            },
            (Endpoint::Chat, None) => Choice::Message {
                index,
                message: Message {
                    role: Some("assistant"),
                    content: Some(text),
                },
                logprobs,
                finish_reason,
            },
            (Endpoint::Chat, Some(first)) => Choice::Delta {
                index,
                delta: Message {
                    role: first.then_some("assistant"),
                    content: (first || !text.is_empty()).then_some(text),
                },
                logprobs,
                finish_reason,
            },
        }
    }

    /// A whole response (`chunk` false) or a stream chunk.
    pub fn envelope(&self, choices: Vec<Choice>, usage: Option<Usage>, chunk: bool) -> Envelope {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        };
        Envelope {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_are_cut_and_their_prefixes_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(visible_len("abc END more", &stops, true), 4);
        assert_eq!(visible_len("abc\n\nEND", &stops, false), 3);
        assert_eq!(
            visible_len("abc EN", &stops, false),
            4,
            "`EN` may become `END`"
        );
        assert_eq!(visible_len("abc EN", &stops, true), 6);
        assert_eq!(visible_len("abc\n", &stops, false), 3);
        assert_eq!(visible_len("abc", &[], false), 3);
        let multibyte = vec!["été".to_string()];
        assert_eq!(visible_len("un é", &multibyte, false), 3);
    }

    #[test]
    fn logprobs_shapes() {
        let tok = |text: &str, logprob: f32, special: bool| Token {
            id: 1,
            text: text.into(),
            logprob,
            special,
        };
        let tokens = vec![
            (
                tok(" a", -0.5, false),
                vec![tok(" a", -0.5, false), tok(" b", -1.0, false)],
            ),
            (tok("</s>", -0.1, true), vec![]),
        ];
        let chat =
            serde_json::to_value(Logprobs::new(Endpoint::Chat, &tokens, true, 0)).expect("json");
        assert_eq!(
            chat,
            serde_json::json!({"content": [{"token": " a", "logprob": -0.5, "bytes": [32, 97],
                "top_logprobs": [{"token": " a", "logprob": -0.5, "bytes": [32, 97]},
                                 {"token": " b", "logprob": -1.0, "bytes": [32, 98]}]}]})
        );
        let legacy = serde_json::to_value(Logprobs::new(Endpoint::Completions, &tokens, true, 3))
            .expect("json");
        assert_eq!(
            legacy,
            serde_json::json!({"tokens": [" a"], "token_logprobs": [-0.5],
                "top_logprobs": [{" a": -0.5, " b": -1.0}], "text_offset": [3]})
        );
        // Two alternatives that decode to the same text: the better one stays.
        let same = vec![(
            tok("\u{fffd}", -0.5, false),
            vec![tok("\u{fffd}", -0.5, false), tok("\u{fffd}", -2.0, false)],
        )];
        let legacy = serde_json::to_value(Logprobs::new(Endpoint::Completions, &same, true, 0))
            .expect("json");
        assert_eq!(
            legacy["top_logprobs"],
            serde_json::json!([{"\u{fffd}": -0.5}])
        );
    }
}
