//! The API-key check of the HTTP front (see [`crate::access`]): every route but health
//! (`GET /`, `/health`, `/ping`) and, unless `--metrics-require-key`, `/metrics`; the
//! management routes with `--admin-api-key`'s keys when set. A refused
//! request gets 401 with `WWW-Authenticate: Bearer`, in OpenAI's error shape on `/v1` routes
//! (`code: invalid_api_key`) and LoRAX's elsewhere (`error_type: unauthorized`).

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::openai::error::OpenAiError;

/// Whether `path` is open without a key.
fn is_open(method: &Method, path: &str, metrics_require_key: bool) -> bool {
    match path {
        "/health" | "/ping" => true,
        "/" => method == Method::GET || method == Method::HEAD,
        "/metrics" => !metrics_require_key,
        _ => false,
    }
}

/// The middleware.
pub(super) async fn require_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let access = &state.config.access;
    let path = req.uri().path();
    let keys = if crate::access::is_admin_path(path) {
        access.admin_keys()
    } else {
        access.keys.clone()
    };
    let Some(keys) = keys else {
        return next.run(req).await;
    };
    if is_open(req.method(), path, access.metrics_require_key) {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match keys.check(header) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let openai = path.starts_with("/v1/");
            let mut response = if openai {
                OpenAiError::Api(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    e.to_string(),
                    "invalid_api_key",
                ))
                .into_response()
            } else {
                ApiError::new(StatusCode::UNAUTHORIZED, e.to_string(), "unauthorized")
                    .into_response()
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_and_metrics_are_open() {
        assert!(is_open(&Method::GET, "/health", true));
        assert!(is_open(&Method::GET, "/ping", true));
        assert!(is_open(&Method::GET, "/", true));
        assert!(!is_open(&Method::POST, "/", false));
        assert!(is_open(&Method::GET, "/metrics", false));
        assert!(!is_open(&Method::GET, "/metrics", true));
        for path in [
            "/generate",
            "/v1/completions",
            "/v1/merges",
            "/info",
            "/tokenize",
        ] {
            assert!(!is_open(&Method::POST, path, false), "{path}");
        }
    }
}
