//! The shard's spans, children of the router's (exported with `--otlp-endpoint`, see
//! [`medley_telemetry`]): one `shard.prefill` span per request of a prefill batch, under the
//! request's own `traceparent` (or the call's metadata when a request has none), and one span
//! per adapter call (`shard.adapter_load`, `shard.adapter_merge`, `shard.adapter_install`)
//! under the call's metadata. Calls without a valid trace context (decode steps, health
//! checks) get no spans, so they never start traces of their own.

use medley_proto::shard::v1 as pb;
use medley_telemetry::{extract_grpc, parse_traceparent, remote_span};
use tonic::metadata::MetadataMap;
use tracing::Span;
use tracing::field::Empty;

/// The `shard.prefill` spans of the requests of `batch`, in batch order.
pub(super) fn prefill_spans(rank: u32, batch: &pb::Batch, metadata: &MetadataMap) -> Vec<Span> {
    let call = extract_grpc(metadata);
    batch
        .requests
        .iter()
        .map(|r| {
            let cx = match r.traceparent.as_deref() {
                Some(tp) => parse_traceparent(tp),
                None => call.clone(),
            };
            remote_span(cx, || {
                tracing::info_span!(
                    "shard.prefill",
                    shard.rank = rank,
                    request.id = r.id,
                    batch.id = batch.id,
                    batch.size = batch.requests.len(),
                    input_tokens = r.input_ids.len(),
                    adapter.slot = r.adapter_slot,
                    forward_ms = Empty,
                    otel.status_code = Empty,
                    error.message = Empty,
                )
            })
        })
        .collect()
}

/// Records the outcome of a step on its spans: the forward time, or the error.
pub(super) fn finish_step<T, E: std::fmt::Display>(
    spans: &[Span],
    result: &Result<T, E>,
    forward_ns: impl Fn(&T) -> u64,
) {
    for span in spans {
        match result {
            Ok(resp) => {
                span.record("forward_ms", forward_ns(resp) as f64 / 1e6);
            }
            Err(e) => failed(span, e),
        }
    }
}

/// Marks `span` failed with `error`.
pub(super) fn failed(span: &Span, error: &impl std::fmt::Display) {
    span.record("otel.status_code", "error");
    span.record("error.message", tracing::field::display(error));
}

/// The span of a `PrepareAdapter` call: `shard.adapter_merge` for a merge, else
/// `shard.adapter_load`.
pub(super) fn prepare_span(
    rank: u32,
    id: u64,
    spec: Option<&pb::AdapterSpec>,
    metadata: &MetadataMap,
) -> Span {
    let (name, components) = match spec.and_then(|s| s.kind.as_ref()) {
        Some(pb::adapter_spec::Kind::Merged(m)) => ("shard.adapter_merge", m.components.len()),
        _ => ("shard.adapter_load", 1),
    };
    remote_span(extract_grpc(metadata), || {
        tracing::info_span!(
            "shard.prepare_adapter",
            otel.name = name,
            otel.kind = "server",
            shard.rank = rank,
            staging.id = id,
            adapter.components = components,
            bytes = Empty,
            load_ms = Empty,
            merge_ms = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        )
    })
}

/// The span of an `InstallAdapter` call.
pub(super) fn install_span(rank: u32, id: u64, slot: u32, metadata: &MetadataMap) -> Span {
    remote_span(extract_grpc(metadata), || {
        tracing::info_span!(
            "shard.adapter_install",
            otel.kind = "server",
            shard.rank = rank,
            staging.id = id,
            adapter.slot = slot,
            otel.status_code = Empty,
            error.message = Empty,
        )
    })
}
