//! [`SpecError`]: every way an adapter selector or a merge can be invalid. The router shows it
//! as HTTP 422 / gRPC INVALID_ARGUMENT, the shard as INVALID_ARGUMENT, `medley merge` as a usage
//! error (exit code 2) — with the same message everywhere.

use crate::adapter::UnknownAdapterSource;
use crate::names::ParseNameError;

/// An invalid `adapter_id` / `adapter_source` / `merged_adapters` selector, or an invalid merge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// `adapter_id` and `merged_adapters` were both given.
    #[error("at most one of `adapter_id` or `merged_adapters` may be provided")]
    ConflictingAdapters,
    /// `merged_adapters.ids` is missing or empty.
    #[error("`merged_adapters.ids` must list at least one adapter id")]
    EmptyMerge,
    /// More adapters than `--max-merge-adapters`.
    #[error("`merged_adapters.ids` may list at most {max} adapters. Given: {given}")]
    TooManyAdapters {
        /// Server limit.
        max: usize,
        /// Number given.
        given: usize,
    },
    /// `weights` does not have one entry per id.
    #[error(
        "`merged_adapters.weights` must have one weight per adapter id. Given: {ids} ids and {weights} weights"
    )]
    WeightCount {
        /// Number of ids.
        ids: usize,
        /// Number of weights.
        weights: usize,
    },
    /// A weight is NaN or infinite.
    #[error("`merged_adapters.weights` must be finite numbers. Given: {value} at index {index}")]
    NonFiniteWeight {
        /// Position in `weights`.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Unknown `merge_strategy`, `majority_sign_method` or semantics.
    #[error("`merged_adapters.{field}`: {error}")]
    UnknownName {
        /// `merge_strategy`, `majority_sign_method` or `semantics`.
        field: &'static str,
        /// The parse error (lists the valid names).
        error: ParseNameError,
    },
    /// A pruning strategy without a density.
    #[error(
        "`merged_adapters.density` is required by the `{strategy}` merge strategy (the fraction of values kept, in [0, 1])"
    )]
    MissingDensity {
        /// Canonical strategy name.
        strategy: &'static str,
    },
    /// Density outside [0, 1] (or not finite).
    #[error("`merged_adapters.density` must be in [0, 1]. Given: {0}")]
    DensityRange(f32),
    /// `svd_rank` of 0.
    #[error("`merged_adapters.svd_rank` must be strictly positive. Given: 0")]
    SvdRank,
    /// `svd_clamp` outside [0, 1] (it is a quantile) or not finite.
    #[error("`merged_adapters.svd_clamp` must be in [0, 1] (a quantile). Given: {0}")]
    SvdClampRange(f32),
    /// The base model named inside a merge.
    #[error(
        "the base model (`{0}`) cannot be part of a merge; list only adapters in `merged_adapters.ids`"
    )]
    BaseInMerge(String),
    /// An empty id inside a merge.
    #[error("`merged_adapters.ids` cannot contain empty ids")]
    EmptyId,
    /// `adapter_source` is not `hub`, `local` or `s3`.
    #[error(transparent)]
    UnknownSource(#[from] UnknownAdapterSource),
    /// A hub id that is not `name` or `org/name`.
    #[error(
        "adapter id `{0}` is not a valid hub repository id (`name` or `org/name`: letters, digits, '-', '_' and '.', without '--' or '..')"
    )]
    InvalidHubId(String),
    /// An S3 id that is not `s3://bucket/prefix`.
    #[error(
        "adapter id `{id}` is not a valid S3 adapter id (`s3://bucket/prefix`, the prefix naming the \"directory\" that holds adapter_config.json and adapter_model.safetensors): {reason}"
    )]
    InvalidS3Id {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local id with `..` components (or otherwise not a plain path).
    #[error("adapter path `{0}` must be a plain path without `..` components")]
    EscapesRoot(String),
    /// An absolute local path outside every `--adapter-root`.
    #[error("adapter path `{0}` is outside the allowed adapter roots")]
    OutsideRoots(String),
    /// `adapter_source: local` while no `--adapter-root` is configured.
    #[error(
        "adapter `{0}` has `adapter_source: local`, but local adapters are disabled on this server (start it with --adapter-root DIR)"
    )]
    LocalDisabled(String),
    /// A wire message without the part that says what to load (a router bug).
    #[error("{0}")]
    Incomplete(&'static str),
}
