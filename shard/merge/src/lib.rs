//! Medley's LoRA merge engine and PEFT adapter I/O.
//!
//! * [`merge`]: the pure engine. Strategies `linear`, `ties`, `dare_linear`, `dare_ties`,
//!   `magnitude_prune`, `cat` and the SVD family, with PEFT (>= 0.19 `add_weighted_adapter`) or
//!   LoRAX semantics ([`Semantics`]).
//! * [`MergeSpec`]: the canonical description of a merge, with a stable encoding and SHA-256
//!   content hash for cache keys.
//! * [`peft`]: reading and writing PEFT adapter directories (`adapter_config.json` +
//!   `adapter_model.safetensors`).
//! * [`fixture`]: deterministic random PEFT adapters for tests and benchmarks.

pub mod adapter;
pub mod engine;
pub mod fixture;
mod linalg;
pub mod matrix;
pub mod peft;
mod rng;
pub mod spec;
pub mod strategy;

#[cfg(test)]
mod golden_tests;

pub use adapter::{AdapterShapeError, LoraAdapter, LoraModule, MergedAdapter, MergedModule};
pub use engine::{MergeError, merge};
pub use matrix::{Matrix, ShapeError};
pub use spec::MergeSpec;
pub use strategy::{Combination, ParseNameError, Semantics, SignMethod, Strategy};
