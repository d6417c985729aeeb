//! Generation routes: `POST /generate` (object), `POST /` and `POST /invocations` (LoRAX compat:
//! a one-element array, or SSE when `stream` is true).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::JsonBody;
use super::types::{CompatGenerateBody, GenerateBody, GenerateResponse};
use super::{AppState, headers, sse};
use crate::infer::GenerateRequest;

/// Like LoRAX: without `api_token` in the body, an `Authorization: Bearer <token>` header is the
/// token used to fetch private hub adapters; except when the server has API keys, where that
/// header is the client's key to this server (never forwarded to the hub, and never a reason to
/// load an adapter again).
fn with_bearer_token(
    state: &AppState,
    headers: &HeaderMap,
    mut request: GenerateRequest,
) -> GenerateRequest {
    if request.parameters.api_token.is_none()
        && state.config.access.keys.is_none()
        && let Some(token) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    {
        request.parameters.api_token = Some(token.to_string());
    }
    request
}

async fn generate_one(
    state: &AppState,
    request: GenerateRequest,
) -> Result<(axum::http::HeaderMap, GenerateResponse), ApiError> {
    let opts = request.parameters.response_options();
    let out = state.infer.generate(request).await?;
    let h = headers::finished(state, &out);
    tracing::debug!(
        generated_tokens = out.generated_text.generated_tokens,
        total_ms = out.timings.total.as_millis() as u64,
        "generation finished"
    );
    Ok((h, GenerateResponse::new(out, opts)))
}

/// `POST /generate`: one JSON object.
#[tracing::instrument(skip_all)]
pub(super) async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    let (h, resp) = generate_one(&state, with_bearer_token(&state, &headers, body.into())).await?;
    Ok((h, Json(resp)).into_response())
}

/// `POST /` and `POST /invocations`: `[GenerateResponse]`, or SSE when `stream` is true.
#[tracing::instrument(skip_all)]
pub(super) async fn compat_generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CompatGenerateBody>,
) -> Result<Response, ApiError> {
    let (request, stream) = body.into_parts();
    let request = with_bearer_token(&state, &headers, request);
    if stream {
        return sse::stream(state, request).await;
    }
    let (h, resp) = generate_one(&state, request).await?;
    Ok((h, Json(vec![resp])).into_response())
}

/// `POST /generate_stream`: server-sent events.
#[tracing::instrument(skip_all)]
pub(super) async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    let request = with_bearer_token(&state, &headers, body.into());
    sse::stream(state, request).await
}
