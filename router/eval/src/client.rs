//! The HTTP client: one greedy `POST /generate` per example, LoRAX wire format, with retries of
//! transient failures (connection errors, timeouts, 429 and 503) and exponential backoff.

use std::time::Duration;

use serde::Serialize;

use crate::error::EvalError;
use crate::systems::{MergeSpec, SystemKind};

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("HTTP {status}: {message}{}", error_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Http {
        /// The status code.
        status: u16,
        /// The body's `error`, else the body itself.
        message: String,
        /// The body's `error_type`, if any.
        error_type: Option<String>,
    },
    /// The request could not be sent or answered (after the retries).
    #[error("request failed after {attempts} attempt(s): {message}")]
    Transport {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// A 2xx answer without a `generated_text`.
    #[error("unexpected reply: {0}")]
    Reply(String),
}

/// How the client talks to the server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080` (no trailing slash needed).
    pub endpoint: String,
    /// `Authorization: Bearer` key, if the server wants one.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries of a transient failure (so `retries + 1` attempts at most).
    pub retries: u32,
    /// First backoff; doubled after each retry.
    pub backoff: Duration,
}

/// The `parameters` of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Parameters<'a> {
    /// Tokens to generate at most.
    pub max_new_tokens: u32,
    /// Always `false`: greedy decoding.
    pub do_sample: bool,
    /// The fixed request seed.
    pub seed: u64,
    /// Always `false`: only the text is scored.
    pub details: bool,
    /// Stop sequences.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub stop: &'a [String],
    /// `adapter_source`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_source: Option<&'a str>,
    /// The single adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_id: Option<&'a str>,
    /// The merge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_adapters: Option<&'a MergeSpec>,
}

impl<'a> Parameters<'a> {
    /// Greedy parameters for `kind`.
    pub fn new(
        kind: &'a SystemKind,
        adapter_source: Option<&'a str>,
        max_new_tokens: u32,
        seed: u64,
        stop: &'a [String],
    ) -> Self {
        let (adapter_id, merged_adapters) = match kind {
            SystemKind::Base => (None, None),
            SystemKind::Adapter { adapter_id } => (Some(adapter_id.as_str()), None),
            SystemKind::Merge { merged_adapters } => (None, Some(merged_adapters)),
        };
        Self {
            max_new_tokens,
            do_sample: false,
            seed,
            details: false,
            stop,
            adapter_source: adapter_source.filter(|_| !matches!(kind, SystemKind::Base)),
            adapter_id,
            merged_adapters,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    inputs: &'a str,
    parameters: &'a Parameters<'a>,
}

/// A `/generate` client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
    generate_url: String,
}

impl Client {
    /// Builds the client.
    pub fn new(config: ClientConfig) -> Result<Self, EvalError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| EvalError::Setup(format!("cannot build the HTTP client: {e}")))?;
        let generate_url = format!("{}/generate", config.endpoint.trim_end_matches('/'));
        Ok(Self {
            http,
            config,
            generate_url,
        })
    }

    /// Checks that the endpoint answers HTTP at all (any status): `GET /health`, retried like a
    /// request. Fails with [`EvalError::Unreachable`].
    pub async fn check_reachable(&self) -> Result<(), EvalError> {
        let url = format!("{}/health", self.config.endpoint.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.authorized(self.http.get(&url)).send().await {
                Ok(_) => return Ok(()),
                Err(e) if attempt > self.config.retries => {
                    return Err(EvalError::Unreachable {
                        endpoint: self.config.endpoint.clone(),
                        message: format!("{} (after {attempt} attempt(s))", error_chain(&e)),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), attempt, "endpoint not reachable yet; retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
    }

    /// Generates for `prompt`; returns the generated text.
    pub async fn generate(
        &self,
        prompt: &str,
        parameters: &Parameters<'_>,
    ) -> Result<String, ClientError> {
        let body = Body {
            inputs: prompt,
            parameters,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.try_generate(&body).await;
            match outcome {
                Ok(text) => return Ok(text),
                Err(e) if !is_transient(&e) || attempt > self.config.retries => {
                    return Err(match e {
                        ClientError::Transport { message, .. } => ClientError::Transport {
                            attempts: attempt,
                            message,
                        },
                        other => other,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "transient failure; retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
    }

    async fn try_generate(&self, body: &Body<'_>) -> Result<String, ClientError> {
        let transport = |e: reqwest::Error| ClientError::Transport {
            attempts: 1,
            message: error_chain(&e),
        };
        let response = self
            .authorized(self.http.post(&self.generate_url))
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let field = |k: &str| {
                json.as_ref()
                    .and_then(|j| j.get(k))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            return Err(ClientError::Http {
                status: status.as_u16(),
                message: field("error").unwrap_or_else(|| text.trim().to_string()),
                error_type: field("error_type"),
            });
        }
        // `/generate` answers an object; LoRAX's compat route an array of them.
        let reply = match json {
            Some(serde_json::Value::Array(mut items)) if !items.is_empty() => items.swap_remove(0),
            Some(other) => other,
            None => return Err(ClientError::Reply(truncate(&text))),
        };
        reply
            .get("generated_text")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| ClientError::Reply(truncate(&text)))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.config
            .backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(10))
    }
}

/// Connection errors, timeouts, 429 (overloaded) and 503 (shard unavailable) are worth retrying.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Transport { .. } => true,
        ClientError::Http { status, .. } => matches!(status, 429 | 503),
        ClientError::Reply(_) => false,
    }
}

/// An error with its sources (reqwest's own message hides "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parameters_are_greedy_and_carry_the_adapter_fields() {
        let stop = vec!["\n".to_string()];
        let base = SystemKind::Base;
        let p = Parameters::new(&base, Some("local"), 8, 42, &stop);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"max_new_tokens": 8, "do_sample": false, "seed": 42,
                               "details": false, "stop": ["\n"]})
        );
        let adapter = SystemKind::Adapter {
            adapter_id: "sql".into(),
        };
        let p = Parameters::new(&adapter, Some("local"), 8, 42, &[]);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["adapter_id"], "sql");
        assert_eq!(v["adapter_source"], "local");
        assert!(v.get("stop").is_none());
        let merge = SystemKind::Merge {
            merged_adapters: MergeSpec {
                ids: vec!["a".into(), "b".into()],
                weights: Some(vec![1.0, 0.5]),
                merge_strategy: Some("ties".into()),
                density: Some(0.5),
                majority_sign_method: None,
                seed: None,
                svd_rank: None,
                svd_clamp: None,
            },
        };
        let v = serde_json::to_value(Parameters::new(&merge, None, 8, 42, &[])).unwrap();
        assert_eq!(
            v["merged_adapters"],
            serde_json::json!({"ids": ["a", "b"], "weights": [1.0, 0.5],
                               "merge_strategy": "ties", "density": 0.5})
        );
        assert!(v.get("adapter_source").is_none());
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let http = |status| ClientError::Http {
            status,
            message: String::new(),
            error_type: None,
        };
        assert!(is_transient(&http(503)));
        assert!(is_transient(&http(429)));
        assert!(!is_transient(&http(400)));
        assert!(!is_transient(&http(404)));
        assert!(!is_transient(&http(500)));
        assert!(is_transient(&ClientError::Transport {
            attempts: 1,
            message: String::new()
        }));
    }

    #[test]
    fn http_errors_show_status_message_and_type() {
        let e = ClientError::Http {
            status: 404,
            message: "adapter `x` not found".into(),
            error_type: Some("not_found".into()),
        };
        assert_eq!(e.to_string(), "HTTP 404: adapter `x` not found (not_found)");
    }
}
