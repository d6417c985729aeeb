//! Medley shard: one tensor-parallel rank of a Llama-family model with its KV cache and LoRA
//! adapters, served to the router over gRPC.
//!
//! * [`model`] — the Llama forward pass over a ragged batch (candle).
//! * [`comm`] — collectives between tensor-parallel ranks ([`comm::Comm`]).
//! * [`device`] — `--device cpu|cuda[:N]|cuda:N:shared`: which device a rank computes on.
//! * [`kv_cache`] — per-sequence key/value storage under a token budget.
//! * [`generation`] — logits processing, sampling, stopping criteria, incremental detokenization.
//! * [`adapters`] — LoRA adapter sources, merges, slots and the batched LoRA forward.
//! * [`engine`] — the thread that owns the model and runs prefill/decode steps on cached batches.
//! * [`server`] — the tonic service in front of the engine.
//! * `fixture` (feature `testing`) — deterministic random checkpoints for tests and benchmarks.
//!
//! Model files are found with `medley-hub`; the adapter/merge request model is `medley-spec`.

pub mod adapters;
pub mod cli;
pub mod comm;
pub mod device;
pub mod engine;
#[cfg(any(test, feature = "testing"))]
pub mod fixture;
pub mod generation;
pub mod kv_cache;
pub mod model;
pub mod server;
