//! `/v1/merges`: named merges at run time (see [`crate::merges`]). Errors have OpenAI's shape,
//! like every `/v1` route.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/merges` | `{name, merged_adapters, adapter_source?}` → 201 and the merge (with its key digest); 409 if the name is taken, 400 if the name or spec is invalid |
//! | `GET /v1/merges` | `{"object": "list", "data": [...]}` |
//! | `GET /v1/merges/{name}` | the merge, or 404 `merge_not_found` |
//! | `DELETE /v1/merges/{name}` | `{"id", "object": "merge", "deleted": true}`, or 404 |
//!
//! Deleting a name does not evict the merged weights the shards may hold: they stay cached (the
//! same spec inline still hits them) until evicted like any adapter.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::openai::error::{OpenAiError, OpenAiJson};
use crate::merges::{MergeDefinition, NamedMerge, NamedMergeError};

impl From<NamedMergeError> for ApiError {
    fn from(e: NamedMergeError) -> Self {
        ApiError::new(e.http_status(), e.to_string(), e.error_type())
    }
}

impl From<NamedMergeError> for OpenAiError {
    fn from(e: NamedMergeError) -> Self {
        OpenAiError::Api(e.into())
    }
}

/// A merge as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct MergeObject {
    /// Always `merge`.
    pub object: &'static str,
    /// The merge.
    #[serde(flatten)]
    pub merge: NamedMerge,
}

impl From<NamedMerge> for MergeObject {
    fn from(merge: NamedMerge) -> Self {
        Self {
            object: "merge",
            merge,
        }
    }
}

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, Serialize)]
pub struct MergeList {
    /// Always `list`.
    pub object: &'static str,
    /// The merges, by name.
    pub data: Vec<MergeObject>,
}

/// The answer to a delete.
#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    /// The name.
    pub id: String,
    /// Always `merge`.
    pub object: &'static str,
    /// Always true.
    pub deleted: bool,
}

/// `POST /v1/merges`.
pub(super) async fn create(
    State(state): State<AppState>,
    OpenAiJson(def): OpenAiJson<MergeDefinition>,
) -> Result<(StatusCode, Json<MergeObject>), OpenAiError> {
    let validation = state.infer.validation();
    let merge = validation
        .merges()
        .register(def, &validation.limits().adapters)?;
    Ok((StatusCode::CREATED, Json(merge.into())))
}

/// `GET /v1/merges`.
pub(super) async fn list(State(state): State<AppState>) -> Json<MergeList> {
    let data = state.infer.validation().merges().list();
    Json(MergeList {
        object: "list",
        data: data.into_iter().map(MergeObject::from).collect(),
    })
}

/// `GET /v1/merges/{name}`.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<MergeObject>, OpenAiError> {
    state
        .infer
        .validation()
        .merges()
        .get(&name)
        .map(|m| Json(m.into()))
        .ok_or_else(|| NamedMergeError::NotFound(name).into())
}

/// `DELETE /v1/merges/{name}`.
pub(super) async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, OpenAiError> {
    let removed = state.infer.validation().merges().remove(&name)?;
    Ok(Json(Deleted {
        id: removed.definition.name,
        object: "merge",
        deleted: true,
    }))
}
