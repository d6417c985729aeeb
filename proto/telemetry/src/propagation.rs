//! W3C trace-context propagation (`traceparent` and `tracestate`) between clients, the router
//! and the shards.
//!
//! Extraction never fails: a missing or malformed `traceparent` gives a [`Context`] without a
//! valid remote span, which [`set_remote_parent`] ignores (the span then starts a new trace).
//! Injection writes nothing when the span has no valid context, e.g. when no OTLP layer is
//! installed, so requests carry trace headers only when tracing is on.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` header (and metadata key).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header (and metadata key).
pub const TRACESTATE: &str = "tracestate";

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// Reads HTTP headers.
struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Reads gRPC metadata (ASCII entries only; trace context is never binary).
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes gRPC metadata; entries that are not valid metadata are skipped.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The client's trace context in HTTP request headers (`traceparent`, `tracestate`).
pub fn extract_http(headers: &tonic::codegen::http::HeaderMap) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// The caller's trace context in gRPC request metadata (`traceparent`, `tracestate`).
pub fn extract_grpc(metadata: &MetadataMap) -> Context {
    propagator().extract(&MetadataExtractor(metadata))
}

/// The context of one `traceparent` value (e.g. the shard API's per-request field); empty when
/// it is malformed.
pub fn parse_traceparent(traceparent: &str) -> Context {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    propagator().extract(&carrier)
}

/// True when `cx` holds a valid (remote or local) span context.
fn is_valid(cx: &Context) -> bool {
    cx.span().span_context().is_valid()
}

/// Makes `span` a child of the remote context `cx` when `cx` is valid; returns whether it did.
/// Call it before `span` is entered or has children (a started span keeps its parent).
pub fn set_remote_parent(span: &tracing::Span, cx: Context) -> bool {
    if !is_valid(&cx) || span.is_disabled() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// A span made by `make` as a child of the remote context `cx`, or [`tracing::Span::none`] when
/// `cx` is not valid: for work done for a remote caller that should not start traces of its
/// own (e.g. a shard's per-request spans).
pub fn remote_span(cx: Context, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !is_valid(&cx) {
        return tracing::Span::none();
    }
    let span = make();
    set_remote_parent(&span, cx);
    span
}

/// The `traceparent` value of `span`, when it has a valid context (an OTLP layer is installed
/// and the span is enabled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    propagator().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Writes the context of `span` into the metadata of an outgoing gRPC request (nothing when it
/// has no valid context).
pub fn inject_span<T>(span: &tracing::Span, request: &mut tonic::Request<T>) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if is_valid(&cx) {
        propagator().inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
    }
}

/// [`inject_span`] with the current span.
pub fn inject_current<T>(request: &mut tonic::Request<T>) {
    inject_span(&tracing::Span::current(), request);
}

#[cfg(test)]
#[path = "propagation_tests.rs"]
mod tests;
