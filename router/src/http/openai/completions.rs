//! `POST /v1/completions`.

use axum::extract::State;
use axum::response::Response;

use super::error::{OpenAiError, OpenAiJson};
use super::plan::{Endpoint, Plan, RouteInput, logprob_count};
use super::types::CompletionRequest;
use super::{json, stream};
use crate::http::AppState;

/// The route input of a completion request; refuses what is not supported (`echo`, `suffix`).
fn route_input(body: &CompletionRequest) -> Result<RouteInput, OpenAiError> {
    if body.echo == Some(true) {
        return Err(OpenAiError::invalid(
            "echo",
            "`echo` is not supported by this server; prepend the prompt yourself",
        ));
    }
    if body.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(OpenAiError::invalid(
            "suffix",
            "`suffix` (insertion) is not supported by this server",
        ));
    }
    let logprobs = body
        .logprobs
        .map(|k| logprob_count("logprobs", k))
        .transpose()?;
    Ok(RouteInput {
        endpoint: Endpoint::Completions,
        prompts: body.prompts()?,
        max_tokens: body.common.max_tokens,
        logprobs,
        best_of: body.best_of,
        add_special_tokens: true,
    })
}

/// `POST /v1/completions`: a JSON `text_completion`, or its chunks as server-sent events.
#[tracing::instrument(skip_all)]
pub(super) async fn completions(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    let input = route_input(&body)?;
    let plan = Plan::new(&state, body.common, body.adapter, input)?;
    if plan.stream {
        stream::respond(&state, plan).await
    } else {
        json::respond(&state, plan).await
    }
}
