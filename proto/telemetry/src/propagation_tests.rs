#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http::{HeaderMap, HeaderValue};
use tracing_subscriber::layer::SubscriberExt;

use super::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn header() -> String {
    format!("00-{TRACE_ID}-{PARENT_ID}-01")
}

/// Runs `f` under a subscriber with an OpenTelemetry layer (no exporter: spans get real
/// contexts, nothing is sent anywhere).
fn with_otel<R>(f: impl FnOnce() -> R) -> R {
    let provider = SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, f)
}

fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn a_valid_traceparent_is_extracted_from_headers_and_metadata() {
    let h = headers(&[(TRACEPARENT, &header()), (TRACESTATE, "vendor=x")]);
    let cx = extract_http(&h);
    let sc = cx.span().span_context().clone();
    assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
    assert_eq!(sc.trace_id().to_string(), TRACE_ID);
    assert_eq!(sc.span_id().to_string(), PARENT_ID);
    assert_eq!(sc.trace_state().get("vendor"), Some("x"));

    let mut md = MetadataMap::new();
    md.insert(TRACEPARENT, header().parse().unwrap());
    md.insert_bin(
        "other-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\x00"),
    );
    assert_eq!(trace_id(&extract_grpc(&md)), TRACE_ID);
    assert_eq!(trace_id(&parse_traceparent(&header())), TRACE_ID);
}

#[test]
fn missing_or_malformed_traceparents_are_ignored() {
    let malformed = [
        String::new(),
        "garbage".into(),
        format!("00-{TRACE_ID}-{PARENT_ID}"),
        format!("00-{}-{PARENT_ID}-01", "0".repeat(32)),
        format!("00-{TRACE_ID}-{}-01", "0".repeat(16)),
        format!("ff-{TRACE_ID}-{PARENT_ID}-01"),
        format!("00-{}-{PARENT_ID}-01", "z".repeat(32)),
    ];
    with_otel(|| {
        assert!(!is_valid(&extract_http(&HeaderMap::new())));
        assert!(!is_valid(&extract_grpc(&MetadataMap::new())));
        for bad in &malformed {
            let cx = extract_http(&headers(&[(TRACEPARENT, bad)]));
            assert!(!is_valid(&cx), "{bad:?}");
            assert!(!is_valid(&parse_traceparent(bad)), "{bad:?}");
            // Ignored: the span starts a trace of its own.
            let span = tracing::info_span!("request");
            assert!(!set_remote_parent(&span, cx));
            let own = traceparent_of(&span).expect("the span has its own context");
            assert!(!own.contains(TRACE_ID), "{own}");
            assert!(remote_span(parse_traceparent(bad), || tracing::info_span!("x")).is_none());
        }
    });
}

#[test]
fn a_span_under_a_remote_parent_is_injected_as_its_child() {
    with_otel(|| {
        let span = tracing::info_span!("request");
        assert!(set_remote_parent(&span, parse_traceparent(&header())));
        let own = traceparent_of(&span).unwrap();
        assert!(own.starts_with(&format!("00-{TRACE_ID}-")), "{own}");
        assert!(!own.contains(PARENT_ID), "the span's own id is sent: {own}");
        assert!(own.ends_with("-01"), "{own}");

        let mut request = tonic::Request::new(());
        span.in_scope(|| inject_current(&mut request));
        let sent = request
            .metadata()
            .get(TRACEPARENT)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(sent, own);
        // What the receiving side reads back.
        let received = extract_grpc(request.metadata());
        assert_eq!(trace_id(&received), TRACE_ID);

        // A child of a remote span made from a per-request field.
        let child = remote_span(parse_traceparent(&own), || tracing::info_span!("child"));
        let child_tp = traceparent_of(&child).unwrap();
        assert!(
            child_tp.starts_with(&format!("00-{TRACE_ID}-")),
            "{child_tp}"
        );
        assert_ne!(child_tp, own);
    });
}

#[test]
fn a_started_span_keeps_its_parent() {
    with_otel(|| {
        let span = tracing::info_span!("request");
        let _ = traceparent_of(&span); // starts it
        assert!(!set_remote_parent(&span, parse_traceparent(&header())));
    });
}

#[test]
fn without_an_otel_layer_nothing_is_injected() {
    // No subscriber at all.
    let span = tracing::info_span!("request");
    assert!(!set_remote_parent(&span, parse_traceparent(&header())));
    assert_eq!(traceparent_of(&span), None);
    let mut request = tonic::Request::new(());
    inject_span(&span, &mut request);
    assert!(request.metadata().is_empty());
    // A subscriber without the OpenTelemetry layer.
    let subscriber = tracing_subscriber::registry();
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("request");
        assert!(!set_remote_parent(&span, parse_traceparent(&header())));
        assert_eq!(traceparent_of(&span), None);
        span.in_scope(|| inject_current(&mut request));
        assert!(request.metadata().is_empty());
    });
}
