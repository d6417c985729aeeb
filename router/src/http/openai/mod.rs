//! OpenAI-compatible routes.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/completions` | `text_completion`, or SSE chunks ending with `data: [DONE]` |
//! | `POST /v1/chat/completions` | `chat.completion`, or SSE `chat.completion.chunk`s |
//! | `GET /v1/models` | the served base model |
//! | `GET /v1/models/{model}` | the base model, else 404 `model_not_found` |
//!
//! `model` is the served model id or an adapter id ([`model`]); the LoRAX fields `adapter_id`,
//! `adapter_source`, `merged_adapters` and `api_token` are accepted in the body as extras.
//! Parameters map onto the LoRAX ones ([`plan`]) and go through the same validation and
//! generation as `/generate`; chat conversations are rendered with the model's chat template
//! ([`template`]). Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
//! ([`error`]).
//!
//! Not supported (400): `echo`, `suffix`, `logit_bias`, `tools`, `best_of` > 1,
//! `response_format` other than text, token-id prompts, non-text content parts.

pub mod chat;
pub mod completions;
pub mod error;
pub mod json;
pub mod model;
pub mod models;
pub mod plan;
pub mod response;
pub mod stream;
pub(crate) mod strftime;
pub mod template;
#[cfg(test)]
mod tests;
pub mod types;
pub mod validation;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Extension, Router};

use super::AppState;
use template::ChatTemplate;

/// The `/v1` routes, with the model's chat template loaded from the directory of its
/// `tokenizer.json`. A missing or broken template is logged here and reported by
/// `/v1/chat/completions`; the other routes work without one.
pub fn routes(state: &AppState) -> Router<AppState> {
    let dir = state
        .config
        .tokenizer_path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let template = ChatTemplate::load(&dir);
    match &template {
        Ok(_) => tracing::info!(dir = %dir.display(), "chat template loaded"),
        Err(e) => tracing::warn!(dir = %dir.display(), "/v1/chat/completions unavailable: {e}"),
    }
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*model}", get(models::retrieve))
        .layer(Extension(Arc::new(template)))
}
