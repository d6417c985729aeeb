//! LoRAX/TGI-compatible REST front (axum).
//!
//! | route | |
//! |---|---|
//! | `POST /`, `POST /invocations` | LoRAX compat: `{inputs, parameters, stream}` → `[GenerateResponse]` or SSE |
//! | `POST /generate` | `{inputs, parameters}` → `GenerateResponse` |
//! | `POST /generate_stream` | `{inputs, parameters}` → SSE of `StreamResponse` |
//! | `GET /health`, `GET /ping`, `GET /` | 200, or 503 `{"error":"unhealthy","error_type":"healthcheck"}` |
//! | `GET /info` | model and limits |
//! | `POST /tokenize` | `{inputs, add_special_tokens?}` → `[{id, text, start, stop}]` |
//! | `GET /metrics` | Prometheus text |
//! | `POST /v1/completions`, `POST /v1/chat/completions` | OpenAI: JSON, or SSE chunks with `stream` ([`openai`]) |
//! | `POST/GET /v1/merges`, `GET/DELETE /v1/merges/{name}` | named merges (`merges`) |
//! | `GET /v1/adapters`, `POST /v1/adapters/{preload,unload}`, `GET/DELETE /v1/adapters/{key}` | adapter management (`admin`) |
//! | `GET /v1/models`, `GET /v1/models/{model}` | OpenAI model list: the served model |
//!
//! With API keys set ([`crate::access`]), every route but health (and `/metrics`, unless
//! `--metrics-require-key`) needs `Authorization: Bearer <key>` (401 otherwise). Bodies above
//! `--max-request-bytes` get 413. The management routes (`/v1/merges*`, `/v1/adapters*`) are
//! absent (404) with `--disable-admin` and take `--admin-api-key`'s keys when set.
//!
//! Every request but the probes and `/metrics` runs in a server span that continues the
//! client's W3C `traceparent`/`tracestate` headers ([`crate::telemetry`]).
//!
//! Every error body is `{"error": "...", "error_type": "..."}`, body-parsing errors, unknown
//! routes (404 `not_found`) and wrong methods (405 `method_not_allowed`) included; except on
//! the OpenAI routes, whose errors are `{"error": {"message", "type", "param", "code"}}`.

mod admin;
mod auth;
mod error;
mod extract;
mod generate;
mod headers;
mod merges;
mod meta;
pub mod openai;
mod sse;
#[cfg(test)]
mod tests;
pub mod types;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

pub use error::{ApiError, ErrorBody};
pub use extract::JsonBody;

use crate::config::RouterConfig;
use crate::infer::Infer;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The generation facade.
    pub infer: Infer,
    /// Server configuration (model id, limits).
    pub config: Arc<RouterConfig>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The REST routes.
pub fn router(state: AppState) -> Router {
    let admin = if state.config.access.admin_enabled {
        admin_routes()
    } else {
        Router::new()
    };
    Router::new()
        .route("/", get(meta::health).post(generate::compat_generate))
        .route("/invocations", post(generate::compat_generate))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/health", get(meta::health))
        .route("/ping", get(meta::health))
        .route("/info", get(meta::info))
        .route("/tokenize", post(meta::tokenize))
        .route("/metrics", get(meta::metrics))
        .merge(openai::routes(&state))
        .merge(admin)
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.access.max_request_bytes,
        ))
        // Outermost: a server span per request, continuing the client's `traceparent`.
        .layer(axum::middleware::from_fn(crate::telemetry::http_trace))
        .with_state(state)
}

/// The management routes: named merges and adapters.
fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/merges", get(merges::list).post(merges::create))
        .route(
            "/v1/merges/{*name}",
            get(merges::retrieve).delete(merges::delete),
        )
        .route("/v1/adapters", get(admin::list))
        .route("/v1/adapters/preload", post(admin::preload))
        .route("/v1/adapters/unload", post(admin::unload))
        .route(
            "/v1/adapters/{key}",
            get(admin::retrieve).delete(admin::delete),
        )
}
