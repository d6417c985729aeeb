//! What adapter management sees and asks of the backend: a snapshot of adapter residency
//! ([`Residency`], one [`AdapterView`] per tracked adapter or merge), preloads (optionally
//! pinned: never evicted) and unloads, with their errors ([`AdminError`]).

use std::time::SystemTime;

use crate::error::InferError;
use crate::infer::{AdapterKey, AdapterSpec};

/// Where a tracked adapter (or merge) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterState {
    /// Requests (or a preload) wait for a load that has not started.
    Waiting,
    /// Being read, merged, staged or installed on the shards.
    Loading,
    /// In a slot: requests run on it.
    Resident,
    /// Not on the shards (evicted or unloaded); remembered for its size.
    Evicted,
    /// Its last load failed; new requests get that error for a while.
    Failed,
}

impl AdapterState {
    /// The wire name (`waiting`, `loading`, `resident`, `evicted`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterState::Waiting => "waiting",
            AdapterState::Loading => "loading",
            AdapterState::Resident => "resident",
            AdapterState::Evicted => "evicted",
            AdapterState::Failed => "failed",
        }
    }
}

/// One tracked adapter or merge.
#[derive(Debug, Clone)]
pub struct AdapterView {
    /// Its canonical key.
    pub key: AdapterKey,
    /// What it is.
    pub spec: AdapterSpec,
    /// Where it is.
    pub state: AdapterState,
    /// Its slot while resident (or being installed).
    pub slot: Option<u32>,
    /// Bytes it holds in a slot (largest over the ranks), once a load reported them.
    pub bytes: Option<u64>,
    /// Never evicted while resident.
    pub pinned: bool,
    /// Its requests in the running batch.
    pub running: usize,
    /// Its requests waiting in its queue.
    pub queued: usize,
    /// When a request last started or finished on it (or it was loaded).
    pub last_used: SystemTime,
    /// The error of its last load, while it is remembered.
    pub error: Option<String>,
}

/// One adapter of a tracked adapter or merge, as management lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Component {
    /// Its id.
    pub id: String,
    /// Its source (`hub`, `local`, ...).
    pub source: String,
    /// Its hub revision, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Its merge weight (merges only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

impl AdapterView {
    /// Its adapters (one for a single adapter) and, for a merge, the strategy.
    pub fn components(&self) -> (Vec<Component>, Option<String>) {
        let component = |r: &medley_spec::AdapterRef, weight: Option<f32>| Component {
            id: r.id.clone(),
            source: r.source.to_string(),
            revision: r.revision.clone(),
            weight,
        };
        match &self.spec {
            AdapterSpec::Base => (Vec::new(), None),
            AdapterSpec::Single(r) => (vec![component(r, None)], None),
            AdapterSpec::Merged(m) => (
                m.components
                    .iter()
                    .zip(&m.merge.weights)
                    .map(|(r, w)| component(r, Some(*w)))
                    .collect(),
                Some(m.merge.strategy.to_string()),
            ),
        }
    }

    /// Unix seconds of its last use.
    pub fn last_used_unix(&self) -> u64 {
        self.last_used
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// Adapter residency on the shards.
#[derive(Debug, Clone, Default)]
pub struct Residency {
    /// Every tracked adapter and merge, resident ones first, then by key.
    pub adapters: Vec<AdapterView>,
    /// Adapter slots of the shards (slot 0, the base model, excluded).
    pub max_slots: u32,
    /// Slots holding an adapter (or reserved by an install or unload in flight).
    pub used_slots: u32,
    /// Bytes of adapter weights the shards may hold (`None`: not limited).
    pub budget_bytes: Option<u64>,
    /// Bytes resident or reserved by installs in flight.
    pub used_bytes: u64,
}

/// Fewest hex digits of a key prefix [`find_key`] accepts.
pub const MIN_KEY_PREFIX: usize = 8;

/// The one key among `keys` whose full hex starts with `prefix` (case-insensitive, at least
/// [`MIN_KEY_PREFIX`] digits).
pub fn find_key<'a>(
    keys: impl IntoIterator<Item = &'a AdapterKey>,
    prefix: &str,
) -> Result<AdapterKey, AdminError> {
    let prefix = prefix.trim().to_ascii_lowercase();
    if prefix.len() < MIN_KEY_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AdminError::BadKey(prefix));
    }
    let mut found = keys.into_iter().filter(|k| k.hex().starts_with(&prefix));
    match (found.next(), found.next()) {
        (Some(k), None) => Ok(*k),
        (None, _) => Err(AdminError::NotTracked(prefix)),
        (Some(_), Some(_)) => Err(AdminError::BadKey(prefix)),
    }
}

/// Why a management call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    /// The key names no tracked adapter.
    #[error("no adapter or merge with key {0} is tracked")]
    NotTracked(String),
    /// A key prefix that is too short, not hex, or matches several adapters.
    #[error(
        "`{0}` is not a usable adapter key: give at least 8 hex digits of a key from the adapter list, matching one adapter"
    )]
    BadKey(String),
    /// The request named the base model, which is always loaded.
    #[error(
        "name an adapter (`adapter_id`) or a merge (`merged_adapters`): the base model is always loaded"
    )]
    BaseModel,
    /// Requests run or wait on it: it cannot be unloaded now.
    #[error(
        "adapter {key} is in use ({running} running, {queued} queued requests); unload it when it is idle"
    )]
    InUse {
        /// Its key.
        key: String,
        /// Requests running on it.
        running: usize,
        /// Requests waiting for it.
        queued: usize,
    },
    /// A load is in flight for it.
    #[error("adapter {0} is loading; unload it once it is resident")]
    Loading(String),
    /// Pinning it would leave no slot for unpinned adapters.
    #[error(
        "cannot pin another adapter: {pinned} of the {slots} adapter slots are pinned and at least one must stay free for other adapters"
    )]
    PinLimit {
        /// Adapters pinned now.
        pinned: usize,
        /// Slots of the shards.
        slots: u32,
    },
    /// Loading it failed (or adapters are disabled): the error a request would get.
    #[error(transparent)]
    Load(#[from] InferError),
}

impl AdminError {
    /// The HTTP status.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            AdminError::NotTracked(_) => StatusCode::NOT_FOUND,
            AdminError::BadKey(_) | AdminError::BaseModel => StatusCode::BAD_REQUEST,
            AdminError::InUse { .. } | AdminError::Loading(_) | AdminError::PinLimit { .. } => {
                StatusCode::CONFLICT
            }
            AdminError::Load(e) => e.http_status(),
        }
    }

    /// The gRPC code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            AdminError::NotTracked(_) => tonic::Code::NotFound,
            AdminError::BadKey(_) | AdminError::BaseModel => tonic::Code::InvalidArgument,
            AdminError::InUse { .. } | AdminError::Loading(_) | AdminError::PinLimit { .. } => {
                tonic::Code::FailedPrecondition
            }
            AdminError::Load(e) => e.grpc_code(),
        }
    }

    /// The machine-readable error type / code (`adapter_not_found`, `adapter_in_use`, ...).
    pub fn error_type(&self) -> &'static str {
        match self {
            AdminError::NotTracked(_) => "adapter_not_found",
            AdminError::BadKey(_) => "invalid_key",
            AdminError::BaseModel => "invalid_request_error",
            AdminError::InUse { .. } => "adapter_in_use",
            AdminError::Loading(_) => "adapter_loading",
            AdminError::PinLimit { .. } => "pin_limit",
            AdminError::Load(e) => e.error_type(),
        }
    }
}

impl From<AdminError> for tonic::Status {
    fn from(e: AdminError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}
