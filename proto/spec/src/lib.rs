//! Medley's adapter/merge request model, shared by the router, the shard and `medley merge`:
//!
//! * [`names`] — strategy, sign-method and semantics names with case-insensitive parsing.
//! * [`merge`] — [`MergeSpec`]: what a merge computes, its canonical form and stable encoding.
//! * [`adapter`] — [`AdapterSpec`] (base / one adapter / a merge), [`AdapterRef`] and the
//!   canonical identity [`AdapterKey`].
//! * [`selector`] — every validation rule and default: a request's adapter fields →
//!   [`AdapterSpec`], and [`MergedAdapters::validate`], the one place a [`MergeSpec`] is built
//!   from user input.
//! * [`s3`] — [`S3Location`]: `s3://bucket/prefix` adapter ids.
//! * [`wire`] — the conversion to and from `medley.shard.v1.AdapterSpec`.
//! * [`SpecError`] — why a selector or merge is invalid (one message on every entry point).
//!
//! The merge engine itself (the tensor math) is `medley-merge`, on the shard side.

pub mod adapter;
mod error;
pub mod merge;
pub mod names;
pub mod s3;
pub mod selector;
pub mod wire;

pub use adapter::{
    AdapterKey, AdapterRef, AdapterSource, AdapterSpec, MergedAdapterSpec, UnknownAdapterSource,
    derived_merge_seed,
};
pub use error::SpecError;
pub use merge::{ENGINE_NUMERICS_VERSION, MergeSpec};
pub use names::{Combination, ParseNameError, Semantics, SignMethod, Strategy};
pub use s3::{S3_SCHEME, S3Location};
pub use selector::{
    AdapterPolicy, AdapterSelector, BASE_MODEL_ADAPTER_ID, MergeLimits, MergedAdapters,
    check_id_shape, is_hub_id, resolve_selector,
};
