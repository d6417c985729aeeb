//! Medley router: the stateless front of the server.
//!
//! * [`http`] — LoRAX/TGI-compatible REST (`/`, `/generate`, `/generate_stream`, `/health`, `/info`,
//!   `/tokenize`, `/metrics`).
//! * [`grpc`] — the public `medley.v1` gRPC service, gRPC health and server reflection.
//! * [`validation`] — parameter checks and tokenization into a [`infer::ValidGenerateRequest`].
//! * [`infer`] — the facade both fronts call: admission, validation, scheduling, streams.
//! * [`backend`] — continuous batching and the gRPC client of the shards.
//! * [`logging`], [`signals`] — process setup shared with the `medley` launcher.
//! * [`telemetry`] — request spans, continued from clients' W3C trace context and exported
//!   over OTLP with `--otlp-endpoint`.
//!
//! The adapter/merge request model (names, validation, canonical keys, proto conversion) is
//! `medley-spec`; this crate links no model code (no candle, no shard, no merge engine).

pub mod access;
pub mod affinity;
pub mod backend;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod logging;
pub mod merges;
pub mod metrics;
pub mod preload;
pub mod server;
pub mod signals;
pub mod telemetry;
pub mod tls;
pub mod validation;
