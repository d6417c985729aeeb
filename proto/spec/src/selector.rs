//! The adapter selector of a request (`adapter_id`, `adapter_source`, `api_token`,
//! `merged_adapters`) → [`AdapterSpec`], checked against the server's [`AdapterPolicy`]; and
//! [`MergedAdapters::validate`], the one place a [`MergeSpec`] is built from what a client,
//! a command line or the wire wrote.
//!
//! * No adapter, an empty id, `__base_model__` or the served model id mean the base model.
//! * `adapter_id` and `merged_adapters` are mutually exclusive.
//! * Hub ids must be `name` or `org/name`; local ids must stay inside an `--adapter-root`
//!   (relative paths without `..`, or absolute paths under a root) and are normalised; S3 ids
//!   must be `s3://bucket/prefix` and are normalised (no trailing `/`).
//! * Merges: 1..=`max_merge_adapters` ids, one finite weight per id, strategy and sign method
//!   parsed case-insensitively (defaults `linear`, `total`), a density in [0, 1] (required by
//!   the pruning strategies), a positive `svd_rank`, an `svd_clamp` in [0, 1], no base model
//!   inside; a DARE merge without a seed gets one derived from the merge itself.

use std::path::{Component, Path, PathBuf};

use crate::adapter::{
    AdapterRef, AdapterSource, AdapterSpec, MergedAdapterSpec, derived_merge_seed,
};
use crate::error::SpecError as E;
use crate::merge::MergeSpec;
use crate::names::{Semantics, SignMethod, Strategy};
use crate::s3::S3Location;

/// LoRAX's pseudo adapter id for the base model.
pub const BASE_MODEL_ADAPTER_ID: &str = "__base_model__";

/// How adapter selectors are validated (from the router's flags).
#[derive(Debug, Clone)]
pub struct AdapterPolicy {
    /// Most adapters one merge may list (`--max-merge-adapters`).
    pub max_merge_adapters: usize,
    /// Directories local adapters may come from (`--adapter-root`, absolute paths).
    pub adapter_roots: Vec<PathBuf>,
    /// Source of adapters whose request names none (`--default-adapter-source`).
    pub default_source: AdapterSource,
    /// Math of per-request merges (`--merge-semantics`).
    pub merge_semantics: Semantics,
    /// The served model id: naming it as an adapter means the base model.
    pub served_model_id: String,
}

/// LoRAX's `merged_adapters` object as a client writes it, every field nullable, plus Medley's
/// `seed`, `svd_rank` and `svd_clamp`. [`MergedAdapters::validate`] turns it into a merge.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct MergedAdapters {
    /// Adapter ids, in merge order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// One weight per id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f32>>,
    /// Strategy name (case-insensitive; default `linear`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_strategy: Option<String>,
    /// Fraction kept by pruning strategies, in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density: Option<f32>,
    /// `total` or `frequency` (case-insensitive; default `total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority_sign_method: Option<String>,
    /// Seed of DARE masks (default: derived from the merge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Rank of SVD-family results (default: the largest component rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svd_rank: Option<u32>,
    /// PEFT's `svd_clamp`: clamp SVD factors to this quantile of their entries, in [0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svd_clamp: Option<f32>,
}

/// The adapter fields of a request, borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdapterSelector<'a> {
    /// `adapter_id`.
    pub adapter_id: Option<&'a str>,
    /// `adapter_source`.
    pub adapter_source: Option<&'a str>,
    /// `api_token`.
    pub api_token: Option<&'a str>,
    /// `merged_adapters`.
    pub merged_adapters: Option<&'a MergedAdapters>,
}

/// Resolves the adapter fields of a request.
pub fn resolve_selector(
    selector: AdapterSelector<'_>,
    policy: &AdapterPolicy,
) -> Result<AdapterSpec, E> {
    let single = selector
        .adapter_id
        .filter(|id| !id.is_empty() && !is_base(id, policy));
    let source = match selector.adapter_source.map(str::trim) {
        None | Some("") => policy.default_source,
        Some(s) => s.parse()?,
    };
    let token = selector
        .api_token
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    match (single, selector.merged_adapters) {
        (Some(_), Some(_)) => Err(E::ConflictingAdapters),
        (Some(id), None) => Ok(AdapterSpec::Single(adapter_ref(id, source, token, policy)?)),
        (None, Some(m)) => {
            let limits = MergeLimits {
                max_adapters: policy.max_merge_adapters,
                semantics: policy.merge_semantics,
            };
            let merged = m.validate(limits, |id| {
                if is_base(id, policy) {
                    Err(E::BaseInMerge(id.to_string()))
                } else {
                    adapter_ref(id, source, token.clone(), policy)
                }
            })?;
            Ok(AdapterSpec::Merged(merged))
        }
        (None, None) => Ok(AdapterSpec::Base),
    }
}

fn is_base(id: &str, policy: &AdapterPolicy) -> bool {
    id == BASE_MODEL_ADAPTER_ID || id == policy.served_model_id
}

/// What a merge may be, besides the rules every merge follows.
#[derive(Debug, Clone, Copy)]
pub struct MergeLimits {
    /// Most components.
    pub max_adapters: usize,
    /// The semantics the merge is computed with.
    pub semantics: Semantics,
}

impl MergedAdapters {
    /// Checks every field and builds the merge: `component` turns each (non-empty) id into its
    /// [`AdapterRef`] (applying the caller's id rules). Defaults: strategy `linear`, sign method
    /// `total`, the seed derived from the merge itself.
    pub fn validate(
        &self,
        limits: MergeLimits,
        mut component: impl FnMut(&str) -> Result<AdapterRef, E>,
    ) -> Result<MergedAdapterSpec, E> {
        let ids = self.ids.as_deref().unwrap_or_default();
        if ids.is_empty() {
            return Err(E::EmptyMerge);
        }
        if ids.len() > limits.max_adapters {
            return Err(E::TooManyAdapters {
                max: limits.max_adapters,
                given: ids.len(),
            });
        }
        let weights = self.weights.clone().unwrap_or_default();
        if weights.len() != ids.len() {
            return Err(E::WeightCount {
                ids: ids.len(),
                weights: weights.len(),
            });
        }
        if let Some((index, &value)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(E::NonFiniteWeight { index, value });
        }
        let components = ids
            .iter()
            .map(|id| {
                if id.is_empty() {
                    Err(E::EmptyId)
                } else {
                    component(id)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let strategy = match nonempty(&self.merge_strategy) {
            None => Strategy::Linear,
            Some(s) => s.parse().map_err(|error| E::UnknownName {
                field: "merge_strategy",
                error,
            })?,
        };
        let sign_method = match nonempty(&self.majority_sign_method) {
            None => SignMethod::Total,
            Some(s) => s.parse().map_err(|error| E::UnknownName {
                field: "majority_sign_method",
                error,
            })?,
        };
        if let Some(d) = self.density
            && !(d.is_finite() && (0.0..=1.0).contains(&d))
        {
            return Err(E::DensityRange(d));
        }
        if strategy.uses_density() && self.density.is_none() {
            return Err(E::MissingDensity {
                strategy: strategy.name(),
            });
        }
        let mut spec = MergeSpec::new(strategy, weights)
            .with_sign_method(sign_method)
            .with_semantics(limits.semantics);
        spec.density = self.density;
        match self.svd_rank {
            Some(0) => return Err(E::SvdRank),
            Some(r) => spec = spec.with_svd_rank(r as usize),
            None => {}
        }
        if let Some(q) = self.svd_clamp {
            if !(q.is_finite() && (0.0..=1.0).contains(&q)) {
                return Err(E::SvdClampRange(q));
            }
            spec = spec.with_svd_clamp(q);
        }
        let seed = self
            .seed
            .unwrap_or_else(|| derived_merge_seed(&components, &spec));
        Ok(MergedAdapterSpec {
            components,
            merge: spec.with_seed(seed),
        })
    }
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Checks one adapter id for its source and normalises it.
fn adapter_ref(
    id: &str,
    source: AdapterSource,
    api_token: Option<String>,
    policy: &AdapterPolicy,
) -> Result<AdapterRef, E> {
    let id = match source {
        AdapterSource::Hub => check_hub_id(id)?.to_string(),
        AdapterSource::Local => local_id(id, &policy.adapter_roots)?,
        AdapterSource::S3 => S3Location::parse(id)?.to_string(),
    };
    Ok(AdapterRef {
        id,
        source,
        revision: None,
        api_token,
    })
}

/// The id rules that need no server policy: a hub id is `name` or `org/name`; a local id is a
/// plain path (no `..`); an S3 id is `s3://bucket/prefix`. Returns the id unchanged.
pub fn check_id_shape(source: AdapterSource, id: &str) -> Result<&str, E> {
    match source {
        AdapterSource::Hub => check_hub_id(id),
        AdapterSource::Local => {
            local_parts(id)?;
            Ok(id)
        }
        AdapterSource::S3 => {
            S3Location::parse(id)?;
            Ok(id)
        }
    }
}

fn check_hub_id(id: &str) -> Result<&str, E> {
    if is_hub_id(id) {
        Ok(id)
    } else {
        Err(E::InvalidHubId(id.to_string()))
    }
}

/// Hugging Face repository id rules: `name` or `org/name`; letters, digits, `-`, `_`, `.`; no
/// `--` or `..`; `-` and `.` neither first nor last; at most 96 characters per part.
pub fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.contains("--")
                && !p.contains("..")
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        })
}

/// The normal components of a local path; `..` (or nothing at all) is refused.
fn local_parts(id: &str) -> Result<Vec<&str>, E> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(id).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(E::EscapesRoot(id.to_string()));
            }
        }
    }
    if parts.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(E::EscapesRoot(id.to_string()));
    }
    Ok(parts)
}

/// A local adapter path, normalised (`.` components dropped): relative paths are resolved by
/// the shard against its roots; absolute ones must lie under one of them.
fn local_id(id: &str, roots: &[PathBuf]) -> Result<String, E> {
    if roots.is_empty() {
        return Err(E::LocalDisabled(id.to_string()));
    }
    let joined = local_parts(id)?.join("/");
    if Path::new(id).is_absolute() {
        let absolute = format!("/{joined}");
        if !roots
            .iter()
            .any(|root| Path::new(&absolute).starts_with(root))
        {
            return Err(E::OutsideRoots(id.to_string()));
        }
        return Ok(absolute);
    }
    Ok(joined)
}

#[cfg(test)]
mod tests;
