//! Non-generation routes: health, info, tokenize, metrics.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::types::{InfoResponse, TokenizeBody};
use crate::metrics::gateway;
use crate::validation::TokenSpan;

/// `GET /health`, `GET /ping`, `GET /`: 200 with an empty body, or 503
/// `{"error":"unhealthy","error_type":"healthcheck"}`.
pub(super) async fn health(State(state): State<AppState>) -> Response {
    if state.infer.health().await {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", "healthcheck").into_response()
    }
}

/// `GET /info`.
pub(super) async fn info(State(state): State<AppState>) -> Json<InfoResponse> {
    let backend = state.infer.backend_info();
    let c = &state.config;
    Json(InfoResponse {
        model_id: c.model_id.clone(),
        model_sha: None,
        model_dtype: backend.model_dtype,
        model_device_type: backend.model_device_type,
        model_pipeline_tag: "text-generation",
        max_concurrent_requests: c.limits.max_concurrent_requests,
        max_best_of: 1,
        max_stop_sequences: c.limits.max_stop_sequences,
        max_input_length: c.limits.max_input_length,
        max_total_tokens: c.limits.max_total_tokens,
        max_new_tokens_default: c.limits.default_max_new_tokens,
        max_top_n_tokens: c.limits.max_top_n_tokens,
        waiting_served_ratio: c.batching.waiting_served_ratio,
        max_batch_total_tokens: c
            .batching
            .max_batch_total_tokens
            .unwrap_or(backend.max_batch_total_tokens),
        max_batch_prefill_tokens: c.batching.max_batch_prefill_tokens,
        max_idle_prefill_tokens: c.batching.idle_prefill_tokens(),
        max_waiting_tokens: c.batching.max_waiting_tokens,
        validation_workers: c.limits.validation_workers,
        eager_prefill: false,
        world_size: backend.world_size,
        version: env!("CARGO_PKG_VERSION"),
        sha: option_env!("MEDLEY_GIT_SHA"),
        docker_label: option_env!("MEDLEY_DOCKER_LABEL"),
        request_logger_url: None,
    })
}

/// `POST /tokenize`: `[{id, text, start, stop}]`.
pub(super) async fn tokenize(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<TokenizeBody>,
) -> Result<Json<Vec<TokenSpan>>, ApiError> {
    let spans = state
        .infer
        .validation()
        .tokenize(body.inputs, body.add_special_tokens.unwrap_or(true))
        .await
        .map_err(|e| ApiError::from(crate::error::InferError::from(e)))?;
    Ok(Json(spans))
}

/// `GET /metrics`: Prometheus text format: the recorder's metrics, then the gateway info gauges
/// ([`gateway`]) computed from the backend's current state.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    let info = state.infer.backend_info();
    let residency = state.infer.backend().residency().ok();
    text.push_str(&gateway::render(gateway::GatewayView {
        info: &info,
        kv: state.infer.backend().kv_blocks(),
        residency: residency.as_ref(),
        merges: state.infer.validation().merges(),
        now: SystemTime::now(),
    }));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Unknown route: 404 with the LoRAX error shape.
pub(super) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
        "not_found",
    )
}

/// Known route, wrong method: 405 with the LoRAX error shape.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
        "method_not_allowed",
    )
}
