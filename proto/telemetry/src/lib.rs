//! Medley's distributed tracing, shared by the router and the shards.
//!
//! * [`otlp`] — the `tracing` layer that batch-exports spans to an OpenTelemetry collector over
//!   OTLP/gRPC (`--otlp-endpoint`), and the [`Tracing`] handle that flushes them on shutdown.
//!   Without an endpoint nothing here is installed and no collector is contacted.
//! * [`propagation`] — W3C trace context (`traceparent`, `tracestate`): read from HTTP headers
//!   and gRPC metadata, written into outgoing gRPC requests and into the per-request
//!   `traceparent` field of the shard API's batch messages. A missing or malformed header is
//!   ignored (the span starts a new trace); it is never an error.
//!
//! Spans are ordinary `tracing` spans; this crate only connects them across processes. It links
//! no model code.

pub mod otlp;
pub mod propagation;

pub use otlp::{OtlpConfig, OtlpLayer, TelemetryError, Tracing};
pub use propagation::{
    extract_grpc, extract_http, inject_current, inject_span, parse_traceparent, remote_span,
    set_remote_parent, traceparent_of,
};

/// Re-exported: the context type the extract functions return.
pub use opentelemetry::Context;
/// Re-exported for resource attributes ([`OtlpConfig::attributes`]).
pub use opentelemetry::KeyValue;
