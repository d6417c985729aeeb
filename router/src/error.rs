//! Router errors and their one mapping to HTTP status + LoRAX `error_type`, and to gRPC codes.
//!
//! | error | HTTP | `error_type` | gRPC |
//! |---|---|---|---|
//! | [`InferError::Validation`] | 422 | `validation` | INVALID_ARGUMENT |
//! | [`InferError::Overloaded`] | 429 | `overloaded` | RESOURCE_EXHAUSTED |
//! | [`InferError::AdapterNotFound`] | 404 | `not_found` | NOT_FOUND |
//! | [`InferError::AdapterAccessDenied`] | 403 | `access_denied` | PERMISSION_DENIED |
//! | [`InferError::Generation`] | 424 | `generation` | FAILED_PRECONDITION |
//! | [`InferError::IncompleteGeneration`] | 500 | `incomplete_generation` | INTERNAL |
//! | [`InferError::Unavailable`] | 503 | `unavailable` | UNAVAILABLE |

use axum::http::StatusCode;
use medley_spec::SpecError;

/// A request that failed validation (HTTP 422 / gRPC INVALID_ARGUMENT).
///
/// Messages are shown to users as `Input validation error: <message>`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The prompt is empty.
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    /// A numeric parameter is outside its allowed range (or not finite).
    #[error("`{field}` must be {requirement}. Given: {given}")]
    Range {
        /// Parameter name as written in the request.
        field: &'static str,
        /// The rule, e.g. `strictly positive`.
        requirement: String,
        /// The value received.
        given: String,
    },
    /// Prompt plus requested new tokens exceed the per-request token limit.
    #[error(
        "`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
    )]
    MaxTotalTokens {
        /// Server limit.
        max_total_tokens: u32,
        /// Prompt tokens.
        input_length: u32,
        /// Requested new tokens.
        max_new_tokens: u32,
    },
    /// The prompt is longer than `--max-input-length` and no truncation was asked.
    #[error(
        "`inputs` must have at most {max_input_length} tokens. Given: {input_length}; set `truncate` to keep only the last tokens"
    )]
    InputLength {
        /// Server limit.
        max_input_length: u32,
        /// Prompt tokens.
        input_length: u32,
    },
    /// Too many stop sequences.
    #[error("`stop` must have at most {max} sequences. Given: {given}")]
    StopSequences {
        /// Server limit.
        max: usize,
        /// Number received.
        given: usize,
    },
    /// A stop sequence is the empty string.
    #[error("`stop` sequences cannot be empty strings")]
    EmptyStopSequence,
    /// The adapter selector or merge is invalid (the rules and messages of `medley-spec`,
    /// shared with the shard and `medley merge`).
    #[error(transparent)]
    Adapter(#[from] SpecError),
    /// The shards have no adapter slots.
    #[error(
        "LoRA adapters are not enabled on this server (the shards report no adapter slots); omit `adapter_id` and `merged_adapters` to run the base model"
    )]
    AdaptersDisabled,
    /// The shards refused the adapter or merge (e.g. mixed ranks for an equal-rank strategy);
    /// the message is the shard's.
    #[error("{0}")]
    AdapterRejected(String),
    /// `merge:<digest>` without `merged_adapters`, and no named merge has that digest.
    #[error(
        "`merge:{0}` names no registered merge here; send the merge's `merged_adapters` with it (the digest labels a merge for routing)"
    )]
    UnknownMergeDigest(String),
    /// `merge:<digest>` with a `merged_adapters` whose digest is another.
    #[error("`merge:{named}` does not match `merged_adapters`, whose digest is `merge:{actual}`")]
    MergeDigestMismatch {
        /// The digest the request named.
        named: String,
        /// The digest of its `merged_adapters`.
        actual: String,
    },
    /// The request asks for a feature this server does not provide.
    #[error("{message}")]
    Unsupported {
        /// The request parameter asking for it.
        param: &'static str,
        /// What is not supported and what to do instead.
        message: String,
    },
    /// Tokenization failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Every way a generation request can fail, from admission to the last token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// The request is invalid.
    #[error("Input validation error: {0}")]
    Validation(#[from] ValidationError),
    /// Too many requests in flight.
    #[error("Model is overloaded")]
    Overloaded,
    /// An adapter of the request does not exist (the message names it).
    #[error("{0}")]
    AdapterNotFound(String),
    /// The adapter's storage refused the server's credentials (e.g. S3 `AccessDenied`); the
    /// message is the shard's and says what to check.
    #[error("{0}")]
    AdapterAccessDenied(String),
    /// The model failed while generating (or an adapter failed to load or merge).
    #[error("Request failed during generation: {0}")]
    Generation(String),
    /// The stream ended before the last token.
    #[error("Incomplete generation")]
    IncompleteGeneration,
    /// No healthy shard can serve the request.
    #[error("Shard not ready: {0}")]
    Unavailable(String),
}

impl InferError {
    /// The LoRAX `error_type` string (also the `err` label of `medley_request_failure`).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation",
            Self::Overloaded => "overloaded",
            Self::AdapterNotFound(_) => "not_found",
            Self::AdapterAccessDenied(_) => "access_denied",
            Self::Generation(_) => "generation",
            Self::IncompleteGeneration => "incomplete_generation",
            Self::Unavailable(_) => "unavailable",
        }
    }

    /// The HTTP status code.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::AdapterNotFound(_) => StatusCode::NOT_FOUND,
            Self::AdapterAccessDenied(_) => StatusCode::FORBIDDEN,
            Self::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Self::IncompleteGeneration => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Validation(_) => tonic::Code::InvalidArgument,
            Self::Overloaded => tonic::Code::ResourceExhausted,
            Self::AdapterNotFound(_) => tonic::Code::NotFound,
            Self::AdapterAccessDenied(_) => tonic::Code::PermissionDenied,
            Self::Generation(_) => tonic::Code::FailedPrecondition,
            Self::IncompleteGeneration => tonic::Code::Internal,
            Self::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
}

impl From<InferError> for tonic::Status {
    fn from(e: InferError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_matches_lorax() {
        let cases = [
            (
                InferError::Validation(ValidationError::EmptyInput),
                422,
                "validation",
                tonic::Code::InvalidArgument,
            ),
            (
                InferError::Overloaded,
                429,
                "overloaded",
                tonic::Code::ResourceExhausted,
            ),
            (
                InferError::AdapterNotFound("x".into()),
                404,
                "not_found",
                tonic::Code::NotFound,
            ),
            (
                InferError::AdapterAccessDenied("x".into()),
                403,
                "access_denied",
                tonic::Code::PermissionDenied,
            ),
            (
                InferError::Generation("x".into()),
                424,
                "generation",
                tonic::Code::FailedPrecondition,
            ),
            (
                InferError::IncompleteGeneration,
                500,
                "incomplete_generation",
                tonic::Code::Internal,
            ),
            (
                InferError::Unavailable("x".into()),
                503,
                "unavailable",
                tonic::Code::Unavailable,
            ),
        ];
        for (err, status, ty, code) in cases {
            assert_eq!(err.http_status().as_u16(), status, "{err}");
            assert_eq!(err.error_type(), ty);
            assert_eq!(err.grpc_code(), code);
            let s = tonic::Status::from(err.clone());
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), err.to_string());
        }
    }

    #[test]
    fn messages_carry_lorax_prefixes() {
        let e = InferError::from(ValidationError::EmptyInput);
        assert_eq!(
            e.to_string(),
            "Input validation error: `inputs` cannot be empty"
        );
        assert_eq!(
            InferError::Generation("boom".into()).to_string(),
            "Request failed during generation: boom"
        );
    }
}
