//! OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and the errors of the
//! `/v1` routes.
//!
//! Errors of the shared pipeline (validation, overload, adapters, shards, body parsing) keep
//! their one mapping to an HTTP status and LoRAX `error_type` ([`crate::error`],
//! [`ApiError`]); this module only translates that pair into OpenAI's vocabulary:
//!
//! | shared mapping | OpenAI status | `type` | `code` |
//! |---|---|---|---|
//! | 400 (bad JSON), 422 (validation, wrong body shape) | 400 | `invalid_request_error` | null |
//! | 404 `not_found` (unknown adapter) | 404 | `invalid_request_error` | `model_not_found` |
//! | 415 (content type) and other 4xx | same | `invalid_request_error` | the `error_type` |
//! | 429 `overloaded` | 429 | `rate_limit_error` | `rate_limit_exceeded` |
//! | 503 `unavailable` | 503 | `server_error` | `service_unavailable` |
//! | 424 `generation`, 500 and other 5xx | same | `server_error` | the `error_type` |

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::super::error::ApiError;
use super::super::extract::JsonBody;
use super::template::TemplateError;
use super::validation::{self, Translated};
use crate::error::InferError;

/// OpenAI's `type` of client errors.
const INVALID_REQUEST: &str = "invalid_request_error";
/// OpenAI's `type` of server errors.
const SERVER_ERROR: &str = "server_error";
/// OpenAI's `code` of an unknown model.
const MODEL_NOT_FOUND: &str = "model_not_found";

/// An error of a `/v1` route.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    /// The request is invalid or asks for something this server does not do (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The request field at fault.
        param: Option<&'static str>,
    },
    /// `model` names neither the served model nor an adapter that can be loaded (404
    /// `model_not_found`).
    #[error("The model `{model}` does not exist: {detail}")]
    ModelNotFound {
        /// The `model` of the request.
        model: String,
        /// Why (the adapter error).
        detail: String,
    },
    /// A validation error of the shared pipeline in OpenAI's words (400; see
    /// [`super::validation`]).
    #[error("{}", .0.message)]
    Validation(Translated),
    /// The chat template is missing, broken, or refused the conversation.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// An error of the shared pipeline, with its status and LoRAX `error_type`.
    #[error("{}", .0.body.error)]
    Api(ApiError),
}

impl OpenAiError {
    /// A 400 about `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// Status, `type`, `code` and `param`.
    fn parts(&self) -> (StatusCode, &'static str, Option<&str>, Option<&'static str>) {
        match self {
            Self::InvalidRequest { param, .. } => {
                (StatusCode::BAD_REQUEST, INVALID_REQUEST, None, *param)
            }
            Self::Validation(t) => (StatusCode::BAD_REQUEST, INVALID_REQUEST, t.code, t.param),
            Self::ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                Some(MODEL_NOT_FOUND),
                Some("model"),
            ),
            Self::Template(e) if e.is_client_error() => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                None,
                Some("messages"),
            ),
            Self::Template(_) => (StatusCode::INTERNAL_SERVER_ERROR, SERVER_ERROR, None, None),
            Self::Api(e) => {
                let (status, kind, code) = translate(e.status, &e.body.error_type);
                (status, kind, code, None)
            }
        }
    }

    /// The JSON body.
    pub fn body(&self) -> OpenAiErrorBody {
        let (_, kind, code, param) = self.parts();
        OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.to_string(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

/// The OpenAI status, `type` and `code` of the shared mapping's status and `error_type`.
fn translate(status: StatusCode, error_type: &str) -> (StatusCode, &'static str, Option<&str>) {
    match status.as_u16() {
        400 | 422 => (StatusCode::BAD_REQUEST, INVALID_REQUEST, None),
        404 if error_type == "not_found" => (status, INVALID_REQUEST, Some(MODEL_NOT_FOUND)),
        429 => (status, "rate_limit_error", Some("rate_limit_exceeded")),
        503 => (status, SERVER_ERROR, Some("service_unavailable")),
        // 424: the model (or an adapter load) failed, not the request.
        400..=499 if status != StatusCode::FAILED_DEPENDENCY => {
            (status, INVALID_REQUEST, Some(error_type))
        }
        _ => (status, SERVER_ERROR, Some(error_type)),
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<InferError> for OpenAiError {
    fn from(e: InferError) -> Self {
        if let InferError::Validation(v) = &e
            && let Some(t) = validation::translate(v)
        {
            return Self::Validation(t);
        }
        Self::Api(ApiError::from(e))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "OpenAI route failed: {self}");
        }
        (status, Json(self.body())).into_response()
    }
}

/// `{"error": {...}}`: the body of every `/v1` error and of mid-stream error events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenAiErrorBody {
    /// The error.
    pub error: OpenAiErrorDetail,
}

/// The fields of an OpenAI error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenAiErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when known.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`...), when there is one.
    pub code: Option<String>,
}

/// A JSON request body whose rejections (bad JSON, wrong shape, wrong content type) are
/// OpenAI-shaped: the same extraction as [`JsonBody`], translated by `translate`.
#[derive(Debug, Clone)]
pub struct OpenAiJson<T>(pub T);

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBody(value) = JsonBody::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ValidationError;

    fn status_type_code(e: OpenAiError) -> (u16, String, Option<String>) {
        let (status, ..) = e.parts();
        let body = e.body().error;
        (status.as_u16(), body.kind, body.code)
    }

    #[test]
    fn shared_errors_translate_to_openai_vocabulary() {
        let cases = [
            (
                // No OpenAI parameter to name: the shared message.
                InferError::Validation(ValidationError::Range {
                    field: "top_k",
                    requirement: "strictly positive".into(),
                    given: "0".into(),
                }),
                (400, INVALID_REQUEST, None),
            ),
            (
                InferError::AdapterNotFound("adapter `x` not found".into()),
                (404, INVALID_REQUEST, Some(MODEL_NOT_FOUND)),
            ),
            (
                InferError::Overloaded,
                (429, "rate_limit_error", Some("rate_limit_exceeded")),
            ),
            (
                InferError::Unavailable("down".into()),
                (503, SERVER_ERROR, Some("service_unavailable")),
            ),
            (
                InferError::Generation("boom".into()),
                (424, SERVER_ERROR, Some("generation")),
            ),
            (
                InferError::IncompleteGeneration,
                (500, SERVER_ERROR, Some("incomplete_generation")),
            ),
        ];
        for (error, (status, kind, code)) in cases {
            let message = error.to_string();
            let e = OpenAiError::from(error);
            assert_eq!(e.body().error.message, message);
            assert_eq!(
                status_type_code(e),
                (status, kind.to_string(), code.map(str::to_string))
            );
        }
        let unsupported_media =
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "json", "validation");
        assert_eq!(
            status_type_code(unsupported_media.into()),
            (415, INVALID_REQUEST.to_string(), Some("validation".into()))
        );
    }

    #[test]
    fn own_errors_name_their_param() {
        let body = OpenAiError::invalid("n", "`n` must be >= 1").body();
        assert_eq!(
            serde_json::to_value(body).expect("json"),
            serde_json::json!({"error": {"message": "`n` must be >= 1",
                "type": "invalid_request_error", "param": "n", "code": null}})
        );
        let e = OpenAiError::ModelNotFound {
            model: "m".into(),
            detail: "adapter `m` not found".into(),
        };
        assert_eq!(status_type_code(e).0, 404);
    }
}
