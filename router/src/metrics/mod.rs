//! Prometheus metrics: the metric names (use these constants everywhere so every layer reports
//! `medley_*` names consistently) and the process-wide recorder rendered by `GET /metrics`.
//!
//! Durations are recorded in seconds, token counts as plain numbers. Histograms whose name ends in
//! `duration`, `seconds`, `tokens` or `length` get explicit buckets, so they render as Prometheus
//! histograms.
//!
//! The metrics an inference gateway's endpoint picker reads (the Gateway API Inference
//! Extension's model-server protocol) are [`REQUESTS_WAITING`], [`REQUESTS_RUNNING`],
//! [`KV_CACHE_UTILIZATION`] and the two info gauges rendered at scrape time by [`gateway`]:
//! [`gateway::KV_CACHE_INFO`] and [`gateway::LORA_REQUESTS_INFO`].

pub mod gateway;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: generation requests received (both fronts).
pub const REQUEST_COUNT: &str = "medley_request_count";
/// Counter: requests that finished with a full response.
pub const REQUEST_SUCCESS: &str = "medley_request_success";
/// Counter: failed requests, labelled `err = <error_type>` (see [`crate::error::InferError::error_type`]).
pub const REQUEST_FAILURE: &str = "medley_request_failure";
/// Histogram: seconds from arrival to the last token.
pub const REQUEST_DURATION: &str = "medley_request_duration";
/// Histogram: seconds spent validating and tokenizing.
pub const REQUEST_VALIDATION_DURATION: &str = "medley_request_validation_duration";
/// Histogram: seconds between entering the queue and the first forward pass.
pub const REQUEST_QUEUE_DURATION: &str = "medley_request_queue_duration";
/// Histogram: seconds from the first forward pass to the last token.
pub const REQUEST_INFERENCE_DURATION: &str = "medley_request_inference_duration";
/// Histogram: tokens generated per successful request.
pub const REQUEST_GENERATED_TOKENS: &str = "medley_request_generated_tokens";
/// Histogram: prompt tokens per validated request.
pub const REQUEST_INPUT_LENGTH: &str = "medley_request_input_length";
/// Label of [`REQUEST_FAILURE`].
pub const FAILURE_LABEL: &str = "err";
/// Histogram: seconds from arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "medley_time_to_first_token_seconds";
/// Histogram: seconds per generated token after the first (one sample per request with at least
/// two tokens).
pub const TIME_PER_OUTPUT_TOKEN: &str = "medley_time_per_output_token_seconds";
/// Counter: admitted requests per adapter, labelled [`ADAPTER_LABEL`] = the name the adapter or
/// merge goes by ([`crate::affinity`]), `__base_model__` for the base model, `__other__` past the
/// first [`MAX_ADAPTER_LABELS`] names.
pub const ADAPTER_REQUEST_COUNT: &str = "medley_adapter_request_count";
/// Label of [`ADAPTER_REQUEST_COUNT`].
pub const ADAPTER_LABEL: &str = "adapter";
/// Distinct adapter labels [`ADAPTER_REQUEST_COUNT`] keeps (bounded cardinality).
pub const MAX_ADAPTER_LABELS: usize = 100;
/// Gauge: requests queued, not yet in the running batch (the protocol's TotalQueuedRequests).
pub const REQUESTS_WAITING: &str = "medley_requests_waiting";
/// Gauge: requests in the running batch.
pub const REQUESTS_RUNNING: &str = "medley_requests_running";
/// Gauge, 0 to 1: the share of the shards' KV block pool held by running sequences after the
/// latest step (their `KvStats`); until a step reported the pool, the share of the KV-cache
/// token budget (`max_batch_total_tokens`) reserved by the running batch (prompt plus
/// `max_new_tokens` of each request: what admission counts).
pub const KV_CACHE_UTILIZATION: &str = "medley_kv_cache_utilization";
/// Gauge: idle KV blocks the shards keep for their cached prefix (evictable), after the latest
/// step.
pub const KV_CACHE_CACHED_BLOCKS: &str = "medley_kv_cache_cached_blocks";
/// Gauge: requests of the running batch preempted by the shards (their KV blocks freed; they
/// are recomputed once blocks are free). No request joins the batch while any is.
pub const REQUESTS_PREEMPTED: &str = "medley_requests_preempted";
/// Counter: prompt tokens whose KV came from the shards' prefix cache (counted with each
/// request's first token).
pub const PREFIX_CACHE_HIT_TOKENS: &str = "medley_prefix_cache_hit_tokens_total";
/// Counter: prompt tokens the shards computed (prompt minus cached, counted with each
/// request's first token).
pub const PREFILL_COMPUTED_TOKENS: &str = "medley_prefill_computed_tokens_total";

/// Bucket bounds (seconds) of every `*duration` histogram.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Bucket bounds of token-count histograms.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

fn builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), DURATION_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("seconds".into()), DURATION_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("tokens".into()), TOKEN_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("length".into()), TOKEN_BUCKETS));
    match with_buckets {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("metrics buckets rejected ({e}); histograms will render as summaries");
            PrometheusBuilder::new()
        }
    }
}

/// Installs the Prometheus recorder as the global `metrics` recorder (once per process; later
/// calls return the same handle) and returns the handle that renders it.
///
/// If another recorder was installed first, a warning is logged and the returned handle renders
/// only what is recorded through it (nothing from the `metrics` macros).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!("a global metrics recorder is already installed: {e}");
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent_and_renders_histograms() {
        let a = install();
        let b = install();
        metrics::counter!(REQUEST_FAILURE, FAILURE_LABEL => "validation").increment(1);
        metrics::histogram!(REQUEST_DURATION).record(0.02);
        metrics::histogram!(REQUEST_GENERATED_TOKENS).record(3.0);
        let text = b.render();
        // Both handles render the one global registry.
        assert!(
            a.render()
                .contains("medley_request_failure{err=\"validation\"}")
        );
        assert!(
            text.contains("medley_request_failure{err=\"validation\"}"),
            "{text}"
        );
        assert!(
            text.contains("medley_request_duration_bucket{le=\"0.025\"}"),
            "{text}"
        );
        assert!(
            text.contains("medley_request_generated_tokens_bucket{le=\"4\"}"),
            "{text}"
        );
    }
}
