//! Medley's LoRA merge engine and PEFT adapter I/O.
//!
//! * [`merge`]: the pure engine. Strategies `linear`, `ties`, `dare_linear`, `dare_ties`,
//!   `magnitude_prune`, `cat` and the SVD family, with PEFT (>= 0.19 `add_weighted_adapter`) or
//!   LoRAX semantics ([`Semantics`]).
//! * [`MergeSpec`] and the strategy names come from `medley-spec` (the request model shared with
//!   the router), re-exported here.
//! * [`peft`]: reading and writing PEFT adapter directories (`adapter_config.json` +
//!   `adapter_model.safetensors`).
//! * `fixture` (feature `testing`): deterministic random PEFT adapters for tests and benchmarks.

pub mod adapter;
pub mod engine;
#[cfg(any(test, feature = "testing"))]
pub mod fixture;
mod linalg;
pub mod matrix;
pub mod peft;
mod rng;

#[cfg(test)]
mod golden_tests;

pub use adapter::{AdapterShapeError, LoraAdapter, LoraModule, MergedAdapter, MergedModule};
pub use engine::{MergeError, merge};
pub use matrix::{Matrix, ShapeError};
pub use medley_spec::{
    Combination, ENGINE_NUMERICS_VERSION, MergeSpec, ParseNameError, Semantics, SignMethod,
    Strategy,
};
