//! Request tracing in the router (exported over OTLP with `--otlp-endpoint`, see
//! [`medley_telemetry`]).
//!
//! Every generation request gets a server span on its front — [`http_trace`] (axum middleware)
//! or [`grpc_server_span`] — that continues the client's W3C trace context (`traceparent`,
//! `tracestate`) when it sends one. Under it:
//!
//! ```text
//! POST /generate                  (server span; `medley.v1.GenerationService/Generate` on gRPC)
//! └─ generate                     (the handler's span)
//!    ├─ validation
//!    ├─ queue                     enqueue → the request joins a batch
//!    │  └─ adapter_load           waits for its adapter or merge to become resident
//!    │     ├─ adapter_prepare     the loader's PrepareAdapter (under the first waiting request)
//!    │     │  └─ shard.adapter_load | shard.adapter_merge   (each shard)
//!    │     │     ├─ adapter_read
//!    │     │     └─ adapter_merge
//!    │     └─ adapter_install
//!    │        └─ shard.adapter_install
//!    ├─ prefill                   its prefill step
//!    │  └─ shard.prefill          (each shard)
//!    └─ decode                    from its first token until it leaves the batch
//! ```
//!
//! Batch RPCs serve many requests: each request's `prefill` span travels to the shards in the
//! request's own `traceparent` field; the RPC's metadata carries the first request's. Decode
//! steps get no spans of their own (one `decode` span per request covers them).

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Span;
use tracing::field::Empty;
use tracing::instrument::Instrument;

/// OTLP settings from the router's flags (`None` without `--otlp-endpoint`).
pub fn otlp_config(args: &crate::config::RouterArgs) -> Option<medley_telemetry::OtlpConfig> {
    let endpoint = args.otlp_endpoint.as_deref()?.trim();
    if endpoint.is_empty() {
        return None;
    }
    Some(medley_telemetry::OtlpConfig::new(
        endpoint,
        args.otlp_service_name.clone(),
    ))
}

/// The service name of the shards of a router named `router`: `medley-shard` for the default
/// `medley-router`, else `<router>-shard`.
pub fn shard_service_name(router: &str) -> String {
    match router.strip_suffix("-router") {
        Some("medley") => "medley-shard".into(),
        _ => format!("{router}-shard"),
    }
}

/// Probes and scrapes, which get no spans (they would start a trace each).
fn untraced(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/" | "/health" | "/ping" | "/metrics")
}

/// Axum middleware: runs the request in an `http_request` server span, a child of the client's
/// `traceparent` when it sends a valid one (ignored otherwise).
pub async fn http_trace(request: Request, next: Next) -> Response {
    if untraced(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let method = request.method().clone();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    medley_telemetry::set_remote_parent(&span, medley_telemetry::extract_http(request.headers()));
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

/// A server span for the gRPC method `method` of `medley.v1.GenerationService`, a child of the
/// caller's `traceparent` metadata when valid. Instrument the handler with it.
pub fn grpc_server_span(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> Span {
    let span = tracing::info_span!(
        "grpc_request",
        otel.name = %format_args!("medley.v1.GenerationService/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "medley.v1.GenerationService",
        rpc.method = method,
    );
    medley_telemetry::set_remote_parent(&span, medley_telemetry::extract_grpc(metadata));
    span
}

/// The `validation` span of a request (under the current span).
pub fn validation_span() -> Span {
    tracing::info_span!("validation")
}

/// The spans of one queued or running request ([`crate::backend`] keeps it with the request);
/// dropping it ends them.
#[derive(Debug)]
pub struct RequestTrace {
    /// The request's span on its front (the parent of the others).
    request: Span,
    /// From enqueue until the request joins a batch.
    queue: Span,
    /// While the request waits for its adapter or merge to be loaded.
    adapter: Span,
    /// The request's prefill.
    prefill: Span,
    /// From the end of its prefill until it leaves the batch.
    decode: Span,
}

impl RequestTrace {
    /// A request queued now, under the current span.
    pub fn enqueued() -> Self {
        let request = Span::current();
        let queue = tracing::info_span!(parent: &request, "queue");
        Self {
            request,
            queue,
            adapter: Span::none(),
            prefill: Span::none(),
            decode: Span::none(),
        }
    }

    /// The request waits for its adapter (`kind`: `single` or `merged`) to be loaded; `miss`:
    /// this request starts the load.
    pub fn adapter_wait(&mut self, kind: &'static str, miss: bool) {
        self.adapter = tracing::info_span!(
            parent: &self.queue,
            "adapter_load",
            adapter.kind = kind,
            adapter.cache = if miss { "miss" } else { "pending" },
            otel.status_code = Empty,
            error.message = Empty,
        );
    }

    /// Its adapter is resident: the wait ends.
    pub fn adapter_ready(&mut self) {
        self.adapter = Span::none();
    }

    /// The span the loader's calls for this request's adapter go under: its wait, else its
    /// queue span.
    pub fn loader_parent(&self) -> Span {
        if self.adapter.is_disabled() {
            self.queue.clone()
        } else {
            self.adapter.clone()
        }
    }

    /// The request joined batch `batch_id` (of `batch_size` requests): the queue (and any
    /// adapter wait) ends and its prefill starts. Returns the prefill's `traceparent` for the
    /// shards (`None` when tracing is off).
    pub fn start_prefill(&mut self, batch_id: u64, batch_size: usize) -> Option<String> {
        self.adapter = Span::none();
        self.queue = Span::none();
        self.prefill = tracing::info_span!(
            parent: &self.request,
            "prefill",
            batch.id = batch_id,
            batch.size = batch_size,
            otel.status_code = Empty,
            error.message = Empty,
        );
        medley_telemetry::traceparent_of(&self.prefill)
    }

    /// The prefill span (to run the batch's prefill call in).
    pub fn prefill_span(&self) -> &Span {
        &self.prefill
    }

    /// Its prefill is done and it stays in the batch: the decode starts.
    pub fn start_decode(&mut self) {
        self.prefill = Span::none();
        self.decode = tracing::info_span!(
            parent: &self.request,
            "decode",
            generated_tokens = Empty,
            finish_reason = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        );
    }

    /// The request finished with `generated_tokens` tokens.
    pub fn finished(&self, generated_tokens: u32, finish_reason: &str) {
        self.decode.record("generated_tokens", generated_tokens);
        self.decode.record("finish_reason", finish_reason);
    }

    /// The request failed with `error` (its adapter's load, its prefill or its decode).
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        for span in [&self.adapter, &self.prefill, &self.decode] {
            span.record("otel.status_code", "error");
            span.record("error.message", tracing::field::display(error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_service_names_follow_the_router() {
        assert_eq!(shard_service_name("medley-router"), "medley-shard");
        assert_eq!(shard_service_name("chat"), "chat-shard");
        assert_eq!(shard_service_name("chat-router"), "chat-router-shard");
    }

    #[test]
    fn probes_are_untraced() {
        assert!(untraced(&Method::GET, "/health"));
        assert!(untraced(&Method::GET, "/"));
        assert!(!untraced(&Method::POST, "/"));
        assert!(!untraced(&Method::POST, "/generate"));
    }

    /// Runs `f` under a subscriber with an OpenTelemetry layer (spans get real contexts;
    /// nothing is exported).
    async fn with_otel<F: std::future::Future>(f: F) -> F::Output {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        f.await
    }

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    /// `POST /generate` (or `GET /health`) with `traceparent`: the prefill `traceparent` a
    /// request queued by the handler would send to the shards (empty when none).
    async fn traced_request(method: &str, path: &str, traceparent: &str) -> String {
        use tower::ServiceExt;
        let handler = || async {
            let mut trace = RequestTrace::enqueued();
            trace.start_prefill(0, 1).unwrap_or_default()
        };
        let app = axum::Router::new()
            .route("/generate", axum::routing::post(handler))
            .route("/health", axum::routing::get(handler))
            .layer(axum::middleware::from_fn(http_trace));
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("traceparent", traceparent)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert!(response.status().is_success());
        let body = axum::body::to_bytes(response.into_body(), 1 << 10)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn http_requests_continue_the_clients_trace() {
        with_otel(async {
            let client = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
            let sent = traced_request("POST", "/generate", &client).await;
            assert!(sent.starts_with(&format!("00-{TRACE_ID}-")), "{sent}");
            assert_ne!(sent, client, "the shards get the request's own span");
            // A malformed traceparent is ignored: a trace of its own.
            let sent = traced_request("POST", "/generate", "00-zz-01").await;
            assert!(
                sent.starts_with("00-") && !sent.contains(TRACE_ID),
                "{sent}"
            );
            // Probes get no server span (the handler's spans have no trace to join).
            let sent = traced_request("GET", "/health", &client).await;
            assert!(!sent.contains(TRACE_ID), "{sent}");
        })
        .await;
    }

    #[test]
    fn a_request_trace_moves_through_its_stages_without_a_subscriber() {
        let none = tracing::subscriber::NoSubscriber::default();
        tracing::subscriber::with_default(none, || {
            let mut t = RequestTrace::enqueued();
            t.adapter_wait("merged", true);
            assert!(
                t.loader_parent().is_disabled(),
                "no subscriber: disabled spans"
            );
            t.adapter_ready();
            assert_eq!(
                t.start_prefill(1, 2),
                None,
                "no traceparent without tracing"
            );
            t.start_decode();
            t.finished(3, "length");
            t.failed(&"boom");
        });
    }
}
