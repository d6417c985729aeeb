//! `GET /v1/models` and `GET /v1/models/{model}`.
//!
//! The list holds the served base model and every named merge (`owned_by: "medley-merge"`), so
//! a client or gateway can discover what `model` may name. Adapters are loaded on demand (any
//! hub or local id may be named) and are not listed yet.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

use super::error::OpenAiError;
use crate::http::AppState;
use crate::merges::NamedMerge;

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelCard {
    /// The id to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds (unknown: 0).
    pub created: u64,
    /// `medley` (the base model) or `medley-merge` (a named merge).
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

fn merge_card(m: NamedMerge) -> ModelCard {
    ModelCard {
        id: m.definition.name,
        object: "model",
        created: m.created,
        owned_by: "medley-merge",
    }
}

/// `GET /v1/models`.
pub(super) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let merges = state.infer.validation().merges().list();
    Json(ModelList {
        object: "list",
        data: std::iter::once(card(&state.config.model_id))
            .chain(merges.into_iter().map(merge_card))
            .collect(),
    })
}

/// `GET /v1/models/{model}`: the base model or a named merge, else 404 `model_not_found`.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, OpenAiError> {
    if model == state.config.model_id {
        Ok(Json(card(&model)))
    } else if let Some(m) = state.infer.validation().merges().get(&model) {
        Ok(Json(merge_card(m)))
    } else {
        Err(OpenAiError::ModelNotFound {
            model,
            detail: "only the base model is listed; adapters load on demand when named in `model`"
                .into(),
        })
    }
}
