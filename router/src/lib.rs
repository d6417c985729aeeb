//! Medley router: the stateless front of the server.
//!
//! * [`http`] — LoRAX/TGI-compatible REST (`/`, `/generate`, `/generate_stream`, `/health`, `/info`,
//!   `/tokenize`, `/metrics`).
//! * [`grpc`] — the public `medley.v1` gRPC service, gRPC health and server reflection.
//! * [`validation`] — parameter checks and tokenization into a [`infer::ValidGenerateRequest`].
//! * [`infer`] — the facade both fronts call: admission, validation, scheduling, streams.
//! * [`backend`] — continuous batching and the gRPC client of the shards.
//! * [`launcher`] — `medley serve`: resolves the model, spawns shards, runs the router.
//! * [`offline_merge`] — `medley merge`: merges PEFT adapters into a new adapter directory.

pub mod backend;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod launcher;
pub mod metrics;
pub mod offline_merge;
pub mod server;
pub mod validation;
