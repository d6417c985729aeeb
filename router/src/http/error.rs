//! The LoRAX error body `{"error": "...", "error_type": "..."}` and the HTTP error response that
//! carries it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::InferError;

/// `error_type` of request-body errors (bad JSON, wrong types, wrong content type).
pub const BODY_ERROR_TYPE: &str = "validation";

/// The JSON body of every error (and of mid-stream SSE error events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// LoRAX error category (`validation`, `overloaded`, `generation`, ...).
    pub error_type: String,
}

impl From<&InferError> for ErrorBody {
    fn from(e: &InferError) -> Self {
        Self {
            error: e.to_string(),
            error_type: e.error_type().to_string(),
        }
    }
}

/// An HTTP error: a status and an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with an explicit status and type.
    pub fn new(
        status: StatusCode,
        error: impl Into<String>,
        error_type: impl Into<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                error_type: error_type.into(),
            },
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        Self {
            status: e.http_status(),
            body: ErrorBody::from(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
