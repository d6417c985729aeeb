//! Named merges: a name that stands for a `merged_adapters` spec (and its adapter source), so
//! clients can ask for a merge by name wherever they can name an adapter: `model` on the OpenAI
//! routes, `adapter_id` on the LoRAX routes and in gRPC.
//!
//! A name expands, during validation, into exactly the selector the client could have written
//! inline (`NamedMerges::expand`); it then goes through the one validation of merges
//! (`medley_spec::resolve_selector`) and gets the same canonical key, so a named merge and the
//! equivalent inline request share one cached merge on the shards.
//!
//! Merges are registered at start-up (`--merges FILE`, JSON or YAML) or at run time
//! (`POST /v1/merges`, the gRPC `MergeService`), and are checked when registered: an invalid
//! spec is refused then, not at first use. A name shadows an adapter with the same id.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use medley_spec::{AdapterPolicy, AdapterSelector, AdapterSpec, MergedAdapters};
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Longest merge name.
pub const MAX_NAME_LEN: usize = 128;

/// What a client registers: a name and the merge it stands for.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MergeDefinition {
    /// The name (`[A-Za-z0-9._:/-]`, at most [`MAX_NAME_LEN`] characters).
    pub name: String,
    /// The merge, as `merged_adapters` in a request.
    pub merged_adapters: MergedAdapters,
    /// Where the adapters come from (`hub`, `local` or `s3`; default: the server's default source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_source: Option<String>,
}

/// A registered merge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedMerge {
    /// The definition as registered.
    #[serde(flatten)]
    pub definition: MergeDefinition,
    /// Short digest of the canonical merge key (the same for every equivalent spec).
    pub key: String,
    /// Unix seconds of the registration.
    pub created: u64,
}

/// Why a merge cannot be registered, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum NamedMergeError {
    /// The name has characters or a length that is not allowed, or names the base model.
    #[error("merge name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A merge with this name exists (delete it first).
    #[error("a merge named {0:?} already exists; delete it first to redefine it")]
    Exists(String),
    /// No merge has this name.
    #[error("no merge is named {0:?}")]
    NotFound(String),
    /// The spec is not a valid merge.
    #[error("merge {name:?}: {source}")]
    Spec {
        /// The name.
        name: String,
        /// Validation's verdict.
        source: ValidationError,
    },
    /// The `--merges` file cannot be read or parsed.
    #[error("--merges {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl NamedMergeError {
    /// The HTTP status: 422 for an invalid name or spec (validation, as elsewhere), 409 for a
    /// name in use, 404 for an unknown name, 500 for a bad `--merges` file.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            Self::InvalidName { .. } | Self::Spec { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Exists(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::File { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The LoRAX-style `error_type` (OpenAI's `code` on the `/v1` routes, but for 422).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidName { .. } | Self::Spec { .. } => "validation",
            Self::Exists(_) => "merge_exists",
            Self::NotFound(_) => "merge_not_found",
            Self::File { .. } => "config",
        }
    }
}

impl From<NamedMergeError> for tonic::Status {
    fn from(e: NamedMergeError) -> Self {
        let code = match &e {
            NamedMergeError::InvalidName { .. } | NamedMergeError::Spec { .. } => {
                tonic::Code::InvalidArgument
            }
            NamedMergeError::Exists(_) => tonic::Code::AlreadyExists,
            NamedMergeError::NotFound(_) => tonic::Code::NotFound,
            NamedMergeError::File { .. } => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// The registry of named merges. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct NamedMerges {
    inner: Arc<RwLock<BTreeMap<String, NamedMerge>>>,
}

impl NamedMerges {
    /// Registers `def` after checking its name and spec against `policy`.
    pub fn register(
        &self,
        def: MergeDefinition,
        policy: &AdapterPolicy,
    ) -> Result<NamedMerge, NamedMergeError> {
        let merge = check(def, policy)?;
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&merge.definition.name) {
            return Err(NamedMergeError::Exists(merge.definition.name));
        }
        map.insert(merge.definition.name.clone(), merge.clone());
        tracing::info!(name = %merge.definition.name, key = %merge.key, "named merge registered");
        Ok(merge)
    }

    /// The merge named `name`.
    pub fn get(&self, name: &str) -> Option<NamedMerge> {
        self.read().get(name).cloned()
    }

    /// Every merge, by name.
    pub fn list(&self) -> Vec<NamedMerge> {
        self.read().values().cloned().collect()
    }

    /// Removes the merge named `name`.
    pub fn remove(&self, name: &str) -> Result<NamedMerge, NamedMergeError> {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let removed = map
            .remove(name)
            .ok_or_else(|| NamedMergeError::NotFound(name.to_string()))?;
        tracing::info!(name, "named merge removed");
        Ok(removed)
    }

    /// A merge whose canonical key has `digest` (its [`NamedMerge::key`]).
    pub fn by_digest(&self, digest: &str) -> Option<NamedMerge> {
        self.read().values().find(|m| m.key == digest).cloned()
    }

    /// The merge an `adapter_id` names, when the request has no `merged_adapters` of its own
    /// (both together are the usual conflict, reported by validation).
    pub fn lookup(&self, selector: &AdapterSelector<'_>) -> Option<NamedMerge> {
        if selector.merged_adapters.is_some() {
            return None;
        }
        selector.adapter_id.and_then(|id| self.get(id.trim()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, NamedMerge>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl NamedMerge {
    /// The selector the name stands for: the merge, its source, and the request's own token.
    pub fn expand<'a>(&'a self, request: &AdapterSelector<'a>) -> AdapterSelector<'a> {
        AdapterSelector {
            adapter_id: None,
            adapter_source: self
                .definition
                .adapter_source
                .as_deref()
                .or(request.adapter_source),
            api_token: request.api_token,
            merged_adapters: Some(&self.definition.merged_adapters),
        }
    }
}

/// Checks a definition: the name's shape, and the spec through the one merge validation.
fn check(def: MergeDefinition, policy: &AdapterPolicy) -> Result<NamedMerge, NamedMergeError> {
    let name = def.name.trim().to_string();
    let invalid = |reason: &str| NamedMergeError::InvalidName {
        name: def.name.clone(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid(&format!(
            "must have 1 to {MAX_NAME_LEN} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c))
    {
        return Err(invalid("may only hold ASCII letters, digits and . _ : / -"));
    }
    if name == policy.served_model_id || name == medley_spec::BASE_MODEL_ADAPTER_ID {
        return Err(invalid("names the base model"));
    }
    let selector = AdapterSelector {
        adapter_id: None,
        adapter_source: def.adapter_source.as_deref(),
        api_token: None,
        merged_adapters: Some(&def.merged_adapters),
    };
    let spec =
        medley_spec::resolve_selector(selector, policy).map_err(|e| NamedMergeError::Spec {
            name: name.clone(),
            source: e.into(),
        })?;
    if !matches!(spec, AdapterSpec::Merged(_)) {
        return Err(NamedMergeError::Spec {
            name,
            source: ValidationError::Adapter(medley_spec::SpecError::EmptyMerge),
        });
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(NamedMerge {
        key: spec.key().to_string(),
        definition: MergeDefinition { name, ..def },
        created,
    })
}

/// The `--merges` file: a list of definitions, or `{"merges": [...]}`; JSON or YAML (by
/// extension: `.json` is JSON, anything else is read as YAML, of which JSON is a subset).
#[derive(Deserialize)]
#[serde(untagged)]
enum MergesFile {
    List(Vec<MergeDefinition>),
    Wrapped { merges: Vec<MergeDefinition> },
}

/// Reads `path` and registers every merge in it (checked against `policy`).
pub fn load_file(path: &Path, policy: &AdapterPolicy) -> Result<NamedMerges, NamedMergeError> {
    let file_error = |reason: String| NamedMergeError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let parsed: MergesFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| file_error(e.to_string()))?
    } else {
        yaml_serde::from_str(&text).map_err(|e| file_error(e.to_string()))?
    };
    let defs = match parsed {
        MergesFile::List(d) | MergesFile::Wrapped { merges: d } => d,
    };
    let merges = NamedMerges::default();
    for def in defs {
        merges.register(def, policy)?;
    }
    Ok(merges)
}

#[cfg(test)]
mod tests;
