//! [`JsonBody`]: axum's `Json` extractor with LoRAX-shaped rejections, so that malformed bodies
//! get `{"error", "error_type": "validation"}` like every other error: invalid JSON → 400, valid
//! JSON of the wrong shape (wrong type, missing field) → 422, wrong content type → 415.

use axum::Json;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::{ApiError, BODY_ERROR_TYPE};

/// A JSON request body.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                rejection.status(),
                rejection.body_text(),
                BODY_ERROR_TYPE,
            )),
        }
    }
}
