//! `POST /v1/chat/completions`: the conversation is rendered with the model's chat template,
//! then generated like a completion (without adding BOS again: the template writes it).

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::response::Response;

use super::error::{OpenAiError, OpenAiJson};
use super::plan::{Endpoint, Plan, RouteInput, logprob_count};
use super::template::{ChatTemplate, TemplateError, TemplateMessage};
use super::types::ChatRequest;
use super::{json, stream};
use crate::http::AppState;

/// The model's chat template, loaded once when the routes are built (or why there is none).
pub type SharedTemplate = Arc<Result<ChatTemplate, TemplateError>>;

/// `logprobs` and `top_logprobs` as the alternatives to return (`None`: no logprobs).
fn logprobs(body: &ChatRequest) -> Result<Option<u32>, OpenAiError> {
    let top = body
        .top_logprobs
        .map(|k| logprob_count("top_logprobs", k))
        .transpose()?;
    match (body.logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(k)) if k > 0 => Err(OpenAiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        )),
        (false, _) => Ok(None),
    }
}

/// The prompt of a conversation.
fn render(template: &SharedTemplate, body: &ChatRequest) -> Result<String, OpenAiError> {
    if body.messages.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    if body.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OpenAiError::invalid(
            "tools",
            "`tools` (function calling) is not supported by this server; omit it",
        ));
    }
    let messages = body
        .messages
        .iter()
        .map(|m| {
            Ok(TemplateMessage {
                role: m.role.clone(),
                content: m.text()?,
                name: m.name.clone(),
            })
        })
        .collect::<Result<Vec<_>, OpenAiError>>()?;
    let template = template.as_ref().as_ref().map_err(|e| e.clone())?;
    Ok(template.render(&messages)?)
}

/// `POST /v1/chat/completions`: a JSON `chat.completion`, or `chat.completion.chunk`s as
/// server-sent events.
#[tracing::instrument(skip_all)]
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    Extension(template): Extension<SharedTemplate>,
    OpenAiJson(body): OpenAiJson<ChatRequest>,
) -> Result<Response, OpenAiError> {
    let prompt = render(&template, &body)?;
    tracing::debug!(prompt_bytes = prompt.len(), "conversation rendered");
    let input = RouteInput {
        endpoint: Endpoint::Chat,
        prompts: vec![prompt],
        max_tokens: body.max_completion_tokens.or(body.common.max_tokens),
        logprobs: logprobs(&body)?,
        best_of: None,
        add_special_tokens: false,
    };
    let plan = Plan::new(&state, body.common, body.adapter, input)?;
    if plan.stream {
        stream::respond(&state, plan).await
    } else {
        json::respond(&state, plan).await
    }
}
