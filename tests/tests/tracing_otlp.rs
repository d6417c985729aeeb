//! Distributed tracing end to end: `medley serve --otlp-endpoint` exports the router's and the
//! shard's spans to an OTLP/gRPC receiver running in this test (the official OpenTelemetry
//! proto definitions, `opentelemetry-proto`), and a request sent with a W3C `traceparent`
//! (HTTP header or gRPC metadata) yields one trace holding both processes' spans, the shard's
//! parented by the router's.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medley_e2e::{Server, ServerOptions, fixture_adapters, tiny_model_dir};
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_proto::v1::{GenerateParameters, GenerateRequest};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::{Value, json};

/// How long exported spans may take to arrive.
const EXPORT_WAIT: Duration = Duration::from_secs(30);

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    /// `service.name` of its resource.
    service: String,
    /// Its resource's `shard.rank`, if any.
    rank: Option<i64>,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
}

/// The in-test collector: keeps every span it receives.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Exported>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = match attribute(&attrs, "service.name") {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                _ => String::new(),
            };
            let rank = match attribute(&attrs, "shard.rank") {
                Some(any_value::Value::IntValue(i)) => Some(*i),
                _ => None,
            };
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Exported {
                    service: service.clone(),
                    rank,
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        self.spans.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a free loopback port; returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    /// The spans of `trace_id` once `done` holds for them (polled; at most [`EXPORT_WAIT`]).
    async fn wait_for(&self, trace_id: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let deadline = Instant::now() + EXPORT_WAIT;
        loop {
            let spans: Vec<Exported> = (self.spans.lock().unwrap().iter())
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} incomplete after {EXPORT_WAIT:?}: {}",
                describe(&spans)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `service:name` of each span, for messages.
fn describe(spans: &[Exported]) -> String {
    let names: BTreeSet<String> = spans
        .iter()
        .map(|s| format!("{}:{}", s.service, s.name))
        .collect();
    format!("{names:?}")
}

/// The spans as an indented tree under the client's span (for messages and `--nocapture`).
fn tree(spans: &[Exported], client_span: &str) -> String {
    fn walk(spans: &[Exported], parent: &str, depth: usize, out: &mut String) {
        for s in spans.iter().filter(|s| s.parent == parent) {
            out.push_str(&format!(
                "{}{} [{}]\n",
                "  ".repeat(depth),
                s.name,
                s.service
            ));
            walk(spans, &s.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, client_span, 0, &mut out);
    out
}

/// The names of the spans of `service`.
fn names(spans: &[Exported], service: &str) -> BTreeSet<String> {
    (spans.iter())
        .filter(|s| s.service == service)
        .map(|s| s.name.clone())
        .collect()
}

/// True when `spans` hold every name of `router` from the router and of `shard` from the shard.
fn has_all(spans: &[Exported], router: &[&str], shard: &[&str]) -> bool {
    let (r, s) = (names(spans, ROUTER), names(spans, SHARD));
    router.iter().all(|n| r.contains(*n)) && shard.iter().all(|n| s.contains(*n))
}

const ROUTER: &str = "medley-router";
const SHARD: &str = "medley-shard";

/// The one span of `service` named `name`.
fn one<'a>(spans: &'a [Exported], service: &str, name: &str) -> &'a Exported {
    let found: Vec<&Exported> = (spans.iter())
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "{service}:{name} in {}", describe(spans));
    found[0]
}

/// Every span's parent is a span of the same trace, except the root, whose parent is the
/// client's span `client_span`.
fn check_tree(spans: &[Exported], client_span: &str) {
    let ids: HashMap<&str, &Exported> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&Exported> = spans.iter().filter(|s| s.parent == client_span).collect();
    assert_eq!(
        roots.len(),
        1,
        "one child of the client: {}",
        describe(spans)
    );
    assert_eq!(roots[0].service, ROUTER);
    for s in spans.iter().filter(|s| s.parent != client_span) {
        assert!(
            ids.contains_key(s.parent.as_str()),
            "{}:{} has a parent outside the trace",
            s.service,
            s.name
        );
    }
    for s in spans.iter().filter(|s| s.service == SHARD) {
        assert_eq!(s.rank, Some(0), "{}: shard.rank", s.name);
    }
}

/// The name of the span `span`'s parent (in `spans`).
fn parent_name<'a>(spans: &'a [Exported], span: &Exported) -> (&'a str, &'a str) {
    let p = (spans.iter())
        .find(|p| p.span_id == span.parent)
        .unwrap_or_else(|| panic!("{}'s parent is missing", span.name));
    (p.service.as_str(), p.name.as_str())
}

fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

/// Greedy `/generate` of 4 tokens with `adapter` fields and `traceparent` (when given).
async fn generate(s: &Server, adapter: Value, traceparent: Option<&str>) -> Value {
    let mut parameters = json!({"max_new_tokens": 4});
    parameters
        .as_object_mut()
        .unwrap()
        .extend(adapter.as_object().unwrap().clone());
    let mut request = s
        .client
        .post(format!("{}/generate", s.http))
        .json(&json!({"inputs": "Once upon a time", "parameters": parameters}));
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn server(endpoint: &str, schedule_delay_ms: u64) -> Server {
    Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--adapter-root".into(),
            fixture_adapters().display().to_string(),
            "--default-adapter-source".into(),
            "local".into(),
            "--otlp-endpoint".into(),
            endpoint.into(),
        ],
        env: vec![(
            "OTEL_BSP_SCHEDULE_DELAY".into(),
            schedule_delay_ms.to_string(),
        )],
        ..Default::default()
    })
    .await
    .unwrap()
}

const MERGE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const SINGLE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GRPC_TRACE: &str = "5c0ad9e3b3c1f7a8a1d2e3f405162738";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// Router spans of a request that waited for its adapter.
const ROUTER_ADAPTER_SPANS: &[&str] = &[
    "POST /generate",
    "generate",
    "validation",
    "queue",
    "adapter_load",
    "adapter_prepare",
    "adapter_install",
    "prefill",
    "decode",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_router_and_shard_spans() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let s = server(&endpoint, 200).await;

    // A merge, loaded (read and merged) by this request.
    let merge = json!({"merged_adapters": {"ids": ["strong_a_r8", "strong_b_r8_attn"],
                       "weights": [1.0, 0.7], "merge_strategy": "ties", "density": 0.5}});
    generate(&s, merge, Some(&traceparent(MERGE_TRACE, CLIENT_SPAN))).await;
    let shard_merge = [
        "shard.prefill",
        "shard.adapter_merge",
        "adapter_read",
        "adapter_merge",
        "shard.adapter_install",
    ];
    let spans = receiver
        .wait_for(MERGE_TRACE, |s| {
            has_all(s, ROUTER_ADAPTER_SPANS, &shard_merge)
        })
        .await;
    check_tree(&spans, CLIENT_SPAN);
    let root = one(&spans, ROUTER, "POST /generate");
    assert_eq!(
        root.parent, CLIENT_SPAN,
        "the router continues the client's span"
    );
    for (span, parent) in [
        ((SHARD, "shard.prefill"), (ROUTER, "prefill")),
        ((SHARD, "shard.adapter_merge"), (ROUTER, "adapter_prepare")),
        ((SHARD, "adapter_merge"), (SHARD, "shard.adapter_merge")),
        (
            (SHARD, "shard.adapter_install"),
            (ROUTER, "adapter_install"),
        ),
        ((ROUTER, "adapter_prepare"), (ROUTER, "adapter_load")),
        ((ROUTER, "adapter_load"), (ROUTER, "queue")),
        ((ROUTER, "queue"), (ROUTER, "generate")),
        ((ROUTER, "validation"), (ROUTER, "generate")),
        ((ROUTER, "prefill"), (ROUTER, "generate")),
        ((ROUTER, "decode"), (ROUTER, "generate")),
        ((ROUTER, "generate"), (ROUTER, "POST /generate")),
    ] {
        let child = one(&spans, span.0, span.1);
        assert_eq!(parent_name(&spans, child), parent, "parent of {span:?}");
    }
    eprintln!("merge trace:\n{}", tree(&spans, CLIENT_SPAN));

    // A single adapter: its load is `shard.adapter_load`.
    generate(
        &s,
        json!({"adapter_id": "a_r4"}),
        Some(&traceparent(SINGLE_TRACE, CLIENT_SPAN)),
    )
    .await;
    let shard_single = [
        "shard.prefill",
        "shard.adapter_load",
        "shard.adapter_install",
    ];
    let spans = receiver
        .wait_for(SINGLE_TRACE, |s| {
            has_all(s, ROUTER_ADAPTER_SPANS, &shard_single)
        })
        .await;
    check_tree(&spans, CLIENT_SPAN);
    assert!(!names(&spans, SHARD).contains("adapter_merge"));
    eprintln!("single-adapter trace:\n{}", tree(&spans, CLIENT_SPAN));

    // A malformed traceparent is ignored: the request is served (in a trace of its own).
    generate(&s, json!({}), Some("00-not-a-trace-01")).await;

    // The gRPC front: `traceparent` metadata. The adapter is resident by now: no load.
    let mut client = GenerationServiceClient::new(s.grpc_channel().await.unwrap());
    let mut request = tonic::Request::new(GenerateRequest {
        inputs: "Once upon a time".into(),
        parameters: Some(GenerateParameters {
            max_new_tokens: Some(4),
            adapter_id: Some("a_r4".into()),
            ..Default::default()
        }),
    });
    request.metadata_mut().insert(
        "traceparent",
        traceparent(GRPC_TRACE, CLIENT_SPAN).parse().unwrap(),
    );
    client.generate(request).await.unwrap();
    let router = ["Generate", "validation", "queue", "prefill", "decode"];
    let router_names: Vec<String> = (router.iter())
        .map(|n| match *n {
            "Generate" => "medley.v1.GenerationService/Generate".to_string(),
            other => other.to_string(),
        })
        .collect();
    let router_names: Vec<&str> = router_names.iter().map(String::as_str).collect();
    let spans = receiver
        .wait_for(GRPC_TRACE, |s| {
            has_all(s, &router_names, &["shard.prefill"])
        })
        .await;
    check_tree(&spans, CLIENT_SPAN);
    let root = one(&spans, ROUTER, "medley.v1.GenerationService/Generate");
    assert_eq!(root.parent, CLIENT_SPAN);
    let prefill = one(&spans, SHARD, "shard.prefill");
    assert_eq!(parent_name(&spans, prefill), (ROUTER, "prefill"));
    assert!(!names(&spans, ROUTER).contains("adapter_load"), "resident");
    eprintln!("gRPC trace:\n{}", tree(&spans, CLIENT_SPAN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_flushed_when_the_server_stops() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // Nothing is exported on schedule during the test: only the shutdown flush sends spans.
    let mut s = server(&endpoint, 600_000).await;
    let trace = "1d2c3b4a59687766554433221100ffee";
    generate(
        &s,
        json!({"adapter_id": "e_r2"}),
        Some(&traceparent(trace, CLIENT_SPAN)),
    )
    .await;
    assert!(s.stop().unwrap().success());
    let spans = receiver
        .wait_for(trace, |s| {
            has_all(
                s,
                ROUTER_ADAPTER_SPANS,
                &["shard.prefill", "shard.adapter_load"],
            )
        })
        .await;
    check_tree(&spans, CLIENT_SPAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_endpoint_stops_the_start_and_a_dead_collector_does_not() {
    let bins = medley_e2e::binaries().unwrap();
    let out = std::process::Command::new(bins.join("medley"))
        .args(["serve", "--otlp-endpoint", "collector:4317"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--otlp-endpoint"), "{stderr}");

    // Nothing listens on this port: the server starts and serves all the same.
    let port = medley_e2e::free_port().unwrap();
    let s = server(&format!("http://127.0.0.1:{port}"), 5_000).await;
    generate(&s, json!({}), Some(&traceparent(SINGLE_TRACE, CLIENT_SPAN))).await;
}
