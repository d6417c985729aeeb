//! `GET /v1/models` and `GET /v1/models/{model}`.
//!
//! The list holds the served base model. Adapters are loaded on demand (any hub or local id may
//! be named), and the router cannot list the shards' resident adapters cheaply yet, so they are
//! not listed; `GET /v1/models/{id}` answers only for the base model too.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::error::OpenAiError;
use crate::http::AppState;

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelCard {
    /// The id to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (unknown: 0).
    pub created: u64,
    /// Always `medley`.
    pub owned_by: &'static str,
}

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelCard>,
}

fn card(id: &str) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        object: "model",
        created: 0,
        owned_by: "medley",
    }
}

/// `GET /v1/models`.
pub(super) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&state.config.model_id)],
    })
}

/// `GET /v1/models/{model}`: the base model, else 404 `model_not_found`.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, OpenAiError> {
    if model == state.config.model_id {
        Ok(Json(card(&model)))
    } else {
        Err(OpenAiError::ModelNotFound {
            model,
            detail: "only the base model is listed; adapters load on demand when named in `model`"
                .into(),
        })
    }
}
