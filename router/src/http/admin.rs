//! `/v1/adapters`: adapter management (see [`crate::backend::adapters`]). Errors have OpenAI's
//! shape, like every `/v1` route. These routes, with `/v1/merges`, are the management routes:
//! `--disable-admin` removes them (404) and `--admin-api-key` gives them their own keys.
//!
//! | route | |
//! |---|---|
//! | `GET /v1/adapters` | every tracked adapter and merge (resident, loading, evicted, failed) with bytes, slot, pin, requests and last use, plus the slots and bytes in use |
//! | `GET /v1/adapters/{key}` | one of them, by key (or a unique prefix of at least 8 hex digits) |
//! | `POST /v1/adapters/preload` | `{adapter_id?, adapter_source?, merged_adapters?, api_token?, pinned?, wait?}` → the adapter once resident (200), or at once with `wait: false` (202 while loading) |
//! | `POST /v1/adapters/unload` | the same adapter fields, or `{key}` → the adapter, evicted and unpinned |
//! | `DELETE /v1/adapters/{key}` | unload by key |
//!
//! The adapter fields are those of `/generate`'s parameters: an `adapter_id` that names a
//! registered merge stands for that merge.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::openai::error::{OpenAiError, OpenAiJson};
use crate::backend::adapters::{
    AdapterState, AdapterView, AdminError, Component, Residency, find_key,
};
use crate::infer::AdapterSpec;
use medley_spec::{AdapterSelector, MergedAdapters};

impl From<AdminError> for OpenAiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Load(e) => OpenAiError::from(e),
            other => OpenAiError::Api(ApiError::new(
                other.http_status(),
                other.to_string(),
                other.error_type(),
            )),
        }
    }
}

/// A tracked adapter or merge as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterObject {
    /// Always `adapter`.
    pub object: &'static str,
    /// The canonical key, 64 hex digits (equal for equivalent specs).
    pub key: String,
    /// `single` or `merged`.
    pub kind: &'static str,
    /// Its adapters (one for a single adapter).
    pub adapters: Vec<Component>,
    /// The merge strategy (merges only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_strategy: Option<String>,
    /// `waiting`, `loading`, `resident`, `evicted` or `failed`.
    pub state: AdapterState,
    /// Its slot on the shards while resident.
    pub slot: Option<u32>,
    /// Bytes it holds (or held) in a slot, largest over the ranks; `null` before a load
    /// reported them.
    pub bytes: Option<u64>,
    /// Never evicted while resident.
    pub pinned: bool,
    /// Its requests running now.
    pub running: usize,
    /// Its requests waiting.
    pub queued: usize,
    /// Unix seconds of its last use (a request started or finished, or it was loaded).
    pub last_used: u64,
    /// The error of its last load, while it is remembered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<AdapterView> for AdapterObject {
    fn from(v: AdapterView) -> Self {
        let (adapters, merge_strategy) = v.components();
        Self {
            object: "adapter",
            key: v.key.hex(),
            kind: v.spec.kind(),
            adapters,
            merge_strategy,
            state: v.state,
            slot: v.slot,
            bytes: v.bytes,
            pinned: v.pinned,
            running: v.running,
            queued: v.queued,
            last_used: v.last_used_unix(),
            error: v.error,
        }
    }
}

/// Slots in use.
#[derive(Debug, Clone, Serialize)]
pub struct SlotUse {
    /// Adapter slots of the shards.
    pub total: u32,
    /// Slots holding (or reserved for) an adapter.
    pub used: u32,
}

/// Adapter bytes in use.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryUse {
    /// Bytes the shards may hold (`null`: not limited).
    pub budget_bytes: Option<u64>,
    /// Bytes resident or reserved.
    pub used_bytes: u64,
}

/// `GET /v1/adapters`.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterList {
    /// Always `list`.
    pub object: &'static str,
    /// Resident adapters first, then by key.
    pub data: Vec<AdapterObject>,
    /// Slots in use.
    pub slots: SlotUse,
    /// Bytes in use.
    pub memory: MemoryUse,
}

impl From<Residency> for AdapterList {
    fn from(r: Residency) -> Self {
        Self {
            object: "list",
            data: r.adapters.into_iter().map(AdapterObject::from).collect(),
            slots: SlotUse {
                total: r.max_slots,
                used: r.used_slots,
            },
            memory: MemoryUse {
                budget_bytes: r.budget_bytes,
                used_bytes: r.used_bytes,
            },
        }
    }
}

/// The adapter fields of a preload or unload, as in `/generate`'s parameters (no `Debug`: it
/// holds an `api_token`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterTarget {
    /// An adapter id, or the name of a registered merge.
    pub adapter_id: Option<String>,
    /// `hub`, `local`, ... (default: the server's).
    pub adapter_source: Option<String>,
    /// A merge.
    pub merged_adapters: Option<MergedAdapters>,
    /// Token for private hub repositories (used to fetch, never logged).
    pub api_token: Option<String>,
    /// Unload only: the adapter's key (or a unique prefix of 8+ hex digits) instead.
    pub key: Option<String>,
    /// Preload only: never evict it (default false).
    pub pinned: Option<bool>,
    /// Preload only: answer once it is resident (default true).
    pub wait: Option<bool>,
}

impl AdapterTarget {
    fn selector(&self) -> AdapterSelector<'_> {
        AdapterSelector {
            adapter_id: self.adapter_id.as_deref(),
            adapter_source: self.adapter_source.as_deref(),
            api_token: self.api_token.as_deref(),
            merged_adapters: self.merged_adapters.as_ref(),
        }
    }

    /// The adapter or merge it names (the base model is refused).
    fn spec(&self, state: &AppState) -> Result<AdapterSpec, OpenAiError> {
        Ok(state.infer.admin_spec(self.selector())?)
    }
}

/// `GET /v1/adapters`.
pub(super) async fn list(State(state): State<AppState>) -> Result<Json<AdapterList>, OpenAiError> {
    Ok(Json(state.infer.backend().residency()?.into()))
}

/// `GET /v1/adapters/{key}`.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<AdapterObject>, OpenAiError> {
    let residency = state.infer.backend().residency()?;
    let found = find_key(residency.adapters.iter().map(|a| &a.key), &key)?;
    residency
        .adapters
        .into_iter()
        .find(|a| a.key == found)
        .map(|a| Json(a.into()))
        .ok_or_else(|| AdminError::NotTracked(key).into())
}

/// `POST /v1/adapters/preload`.
pub(super) async fn preload(
    State(state): State<AppState>,
    OpenAiJson(target): OpenAiJson<AdapterTarget>,
) -> Result<(StatusCode, Json<AdapterObject>), OpenAiError> {
    if target.key.is_some() {
        return Err(OpenAiError::InvalidRequest {
            message: "preload names an adapter by its fields (`adapter_id`, `merged_adapters`), not by `key`".into(),
            param: Some("key"),
        });
    }
    let spec = target.spec(&state)?;
    let pinned = target.pinned.unwrap_or(false);
    let wait = target.wait.unwrap_or(true);
    tracing::info!(adapter = %spec.ids(), key = %spec.key(), pinned, "preloading adapter");
    let view = state.infer.backend().preload(spec, pinned, wait).await?;
    let status = if view.state == AdapterState::Resident {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(view.into())))
}

/// `POST /v1/adapters/unload`.
pub(super) async fn unload(
    State(state): State<AppState>,
    OpenAiJson(target): OpenAiJson<AdapterTarget>,
) -> Result<Json<AdapterObject>, OpenAiError> {
    if target.pinned.is_some() || target.wait.is_some() {
        return Err(OpenAiError::InvalidRequest {
            message: "`pinned` and `wait` are preload fields".into(),
            param: Some(if target.pinned.is_some() {
                "pinned"
            } else {
                "wait"
            }),
        });
    }
    let key = match &target.key {
        Some(key) => key.clone(),
        None => target.spec(&state)?.key().hex(),
    };
    unload_key(&state, &key)
}

/// `DELETE /v1/adapters/{key}`.
pub(super) async fn delete(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<AdapterObject>, OpenAiError> {
    unload_key(&state, &key)
}

fn unload_key(state: &AppState, key: &str) -> Result<Json<AdapterObject>, OpenAiError> {
    let view = state.infer.backend().unload(key)?;
    tracing::info!(key = %view.key, "adapter unloaded");
    Ok(Json(view.into()))
}
