//! Adapter selection over REST: every invalid selector is a 422 with its message; against the
//! real batching backend over a fake shard, unknown adapters are 404, merges the shard refuses
//! (mixed ranks) are 422, other load failures are 424, and base, single and merged requests mix.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::post_json;
use crate::backend::ShardBackend;
use crate::backend::testing::{FakeAdapter, FakeShard, FakeShardConfig};
use crate::infer::testing::{
    FakeBackend, TEST_ADAPTER_ROOT, TestServer, test_config, test_limits, word_tokenizer,
};
use crate::infer::{AdapterSource, AdapterSpec};
use crate::server::Server;

fn validation(message: &str) -> Value {
    json!({"error": format!("Input validation error: {message}"), "error_type": "validation"})
}

fn merged(m: Value) -> Value {
    json!({"inputs": "hi", "parameters": {"max_new_tokens": 1, "merged_adapters": m}})
}

#[tokio::test]
async fn every_invalid_adapter_selector_is_422_with_its_message() {
    let server = TestServer::start(FakeBackend::new()).await;
    let two = |extra: Value| {
        let mut m = json!({"ids": ["org/a", "org/b"], "weights": [1.0, 0.5]});
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        merged(m)
    };
    let cases: Vec<(Value, String)> = vec![
        (
            merged(json!({"ids": [], "weights": []})),
            "`merged_adapters.ids` must list at least one adapter id".into(),
        ),
        (
            two(json!({"weights": [1.0]})),
            "`merged_adapters.weights` must have one weight per adapter id. Given: 2 ids and 1 weights".into(),
        ),
        (
            two(json!({"weights": null})),
            "`merged_adapters.weights` must have one weight per adapter id. Given: 2 ids and 0 weights".into(),
        ),
        (
            two(json!({"weights": [1.0, 1e39]})),
            "`merged_adapters.weights` must be finite numbers. Given: inf at index 1".into(),
        ),
        (
            two(json!({"merge_strategy": "slerp"})),
            "`merged_adapters.merge_strategy`: unknown merge strategy 'slerp'; valid values: linear, ties, dare_linear, dare_ties, magnitude_prune, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd".into(),
        ),
        (
            two(json!({"merge_strategy": "ties", "density": 0.5, "majority_sign_method": "majority"})),
            "`merged_adapters.majority_sign_method`: unknown majority sign method 'majority'; valid values: total, frequency".into(),
        ),
        (
            two(json!({"merge_strategy": "TIES"})),
            "`merged_adapters.density` is required by the `ties` merge strategy (the fraction of values kept, in [0, 1])".into(),
        ),
        (
            two(json!({"merge_strategy": "magnitude_prune_svd"})),
            "`merged_adapters.density` is required by the `magnitude_prune_svd` merge strategy (the fraction of values kept, in [0, 1])".into(),
        ),
        (
            two(json!({"merge_strategy": "dare_linear", "density": 1.5})),
            "`merged_adapters.density` must be in [0, 1]. Given: 1.5".into(),
        ),
        (
            two(json!({"merge_strategy": "svd", "svd_rank": 0})),
            "`merged_adapters.svd_rank` must be strictly positive. Given: 0".into(),
        ),
        (
            merged(json!({"ids": ["org/a", "__base_model__"], "weights": [1.0, 1.0]})),
            "the base model (`__base_model__`) cannot be part of a merge; list only adapters in `merged_adapters.ids`".into(),
        ),
        (
            merged(json!({"ids": ["test/tiny-model", "org/a"], "weights": [1.0, 1.0]})),
            "the base model (`test/tiny-model`) cannot be part of a merge; list only adapters in `merged_adapters.ids`".into(),
        ),
        (
            merged(json!({"ids": ["a", "b", "c", "d"], "weights": [1.0, 1.0, 1.0, 1.0]})),
            "`merged_adapters.ids` may list at most 3 adapters. Given: 4".into(),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "../../etc/lora", "adapter_source": "local"}}),
            "adapter path `../../etc/lora` must be a plain path without `..` components".into(),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": format!("{TEST_ADAPTER_ROOT}/../x"), "adapter_source": "local"}}),
            format!("adapter path `{TEST_ADAPTER_ROOT}/../x` must be a plain path without `..` components"),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "/etc/lora", "adapter_source": "local"}}),
            "adapter path `/etc/lora` is outside the allowed adapter roots".into(),
        ),
        (
            merged(json!({"ids": ["ok", "../x"], "weights": [1.0, 1.0]})),
            "adapter id `../x` is not a valid hub repository id (`name` or `org/name`: letters, digits, '-', '_' and '.', without '--' or '..')".into(),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "org/a", "adapter_source": "gcs"}}),
            "`adapter_source` must be one of hub, local, s3. Given: gcs".into(),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "org/a", "adapter_source": "s3"}}),
            "adapter id `org/a` is not a valid S3 adapter id (`s3://bucket/prefix`, the prefix naming the \"directory\" that holds adapter_config.json and adapter_model.safetensors): it does not start with `s3://`".into(),
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "x", "merged_adapters": {"ids": ["a"], "weights": [1.0]}}}),
            "at most one of `adapter_id` or `merged_adapters` may be provided".into(),
        ),
    ];
    for (body, message) in cases {
        let (status, _, reply) = post_json(&server.url("/generate"), &body.to_string()).await;
        assert_eq!(status, 422, "{body}: {reply}");
        assert_eq!(reply, validation(&message), "{body}");
    }
    assert!(
        server.backend.requests().is_empty(),
        "nothing invalid was scheduled"
    );

    // Valid selectors reach the backend resolved.
    let ok = [
        two(
            json!({"merge_strategy": "DARE_TIES", "density": 0.3, "majority_sign_method": "Frequency"}),
        ),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 1, "adapter_id": "team/lora", "adapter_source": "LOCAL"}}),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 1, "adapter_id": format!("{TEST_ADAPTER_ROOT}/x"), "adapter_source": "local"}}),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 1, "adapter_id": "test/tiny-model"}}),
    ];
    for body in &ok {
        let (status, _, reply) = post_json(&server.url("/generate"), &body.to_string()).await;
        assert_eq!(status, 200, "{body}: {reply}");
    }
    let requests = server.backend.requests();
    assert!(matches!(requests[0].adapter, AdapterSpec::Merged(_)));
    match &requests[1].adapter {
        AdapterSpec::Single(r) => {
            assert_eq!(
                (r.id.as_str(), r.source),
                ("team/lora", AdapterSource::Local)
            )
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

/// A router over the real batching backend and a [`FakeShard`].
struct ShardServer {
    http: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl ShardServer {
    async fn start(shard: FakeShard) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokenizer.json");
        word_tokenizer().save(&path, false).expect("save tokenizer");
        let config = test_config(test_limits(), path);
        let backend = ShardBackend::start(shard, &config).await.expect("backend");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = Server::from_listeners(config, Arc::new(backend), http, grpc).expect("server");
        let addr = server.http_addr();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            http: addr,
            shutdown: Some(tx),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

impl Drop for ShardServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn adapter_load_failures_map_to_404_422_and_424() {
    let adapters: HashMap<String, FakeAdapter> = [
        ("org/a", FakeAdapter::new(10, 8)),
        ("org/b", FakeAdapter::new(10, 8)),
        ("org/r16", FakeAdapter::new(10, 16)),
        (
            "org/broken",
            FakeAdapter::failing(tonic::Code::Internal, "safetensors header is corrupt"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let shard = FakeShard::new(FakeShardConfig {
        slots: 4,
        budget: 1000,
        step_delay: Duration::from_millis(1),
        adapters,
        ..Default::default()
    });
    let server = ShardServer::start(shard.clone()).await;
    let generate = |params: Value| {
        let mut p = json!({"max_new_tokens": 2});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), params.as_object()) {
            p.extend(extra.clone());
        }
        json!({"inputs": "hello world", "parameters": p}).to_string()
    };
    let cases: Vec<(String, u16, Value)> = vec![
        (
            generate(json!({})),
            200,
            json!({"generated_text": " base base"}),
        ),
        (
            generate(json!({"adapter_id": "org/a"})),
            200,
            json!({"generated_text": " org/a org/a"}),
        ),
        (
            generate(
                json!({"merged_adapters": {"ids": ["org/a", "org/b"], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5}}),
            ),
            200,
            json!({"generated_text": " merge(org/a,org/b) merge(org/a,org/b)"}),
        ),
        (
            generate(json!({"adapter_id": "org/missing"})),
            404,
            json!({"error": "adapter `org/missing` (hub) not found: adapter 'org/missing' not found", "error_type": "not_found"}),
        ),
        (
            generate(
                json!({"merged_adapters": {"ids": ["org/a", "org/r16"], "weights": [1.0, 1.0]}}),
            ),
            422,
            validation(
                "cannot merge adapters of different ranks {8, 16} with `linear`; use `cat` (or an SVD strategy)",
            ),
        ),
        (
            generate(
                json!({"merged_adapters": {"ids": ["org/a", "org/r16"], "weights": [1.0, 1.0], "merge_strategy": "cat"}}),
            ),
            200,
            json!({"generated_text": " merge(org/a,org/r16) merge(org/a,org/r16)"}),
        ),
        (
            generate(json!({"adapter_id": "org/broken"})),
            424,
            json!({"error": "Request failed during generation: Server error: safetensors header is corrupt", "error_type": "generation"}),
        ),
    ];
    // All at once: a failing adapter fails only the requests that asked for it.
    let replies = futures::future::join_all(
        cases
            .iter()
            .map(|(body, _, _)| post_json_owned(server.url("/generate"), body.clone())),
    )
    .await;
    for ((body, status, expected), (got_status, reply)) in cases.iter().zip(replies) {
        assert_eq!(got_status, *status, "{body}: {reply}");
        assert_eq!(&reply, expected, "{body}");
    }
    assert!(shard.violations().is_empty(), "{:?}", shard.violations());
    // Adapter residency and loads are visible in /metrics.
    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for name in [
        "medley_adapter_cache_misses{kind=\"single\"}",
        "medley_adapter_cache_misses{kind=\"merged\"}",
        "medley_adapter_load_duration_bucket",
        "medley_adapter_merge_duration_bucket",
        "medley_adapter_resident_bytes",
        "medley_adapter_resident",
        "medley_adapter_load_failures{code=\"NotFound\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

async fn post_json_owned(url: String, body: String) -> (u16, Value) {
    let (status, _, reply) = post_json(&url, &body).await;
    (status.as_u16(), reply)
}

#[tokio::test]
async fn streams_fail_with_http_status_and_adapter_headers_and_bearer_tokens_pass_through() {
    let adapters: HashMap<String, FakeAdapter> = [("org/a", FakeAdapter::new(10, 8))]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let shard = FakeShard::new(FakeShardConfig {
        slots: 2,
        budget: 1000,
        step_delay: Duration::from_millis(1),
        adapters,
        ..Default::default()
    });
    let server = ShardServer::start(shard.clone()).await;
    let client = reqwest::Client::new();
    let body = |id: &str| json!({"inputs": "hello", "parameters": {"max_new_tokens": 2, "adapter_id": id}});

    // An unknown adapter on a streaming route is a 404 before any event, not a 200 stream.
    let r = client
        .post(server.url("/generate_stream"))
        .json(&body("org/missing"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error_type"], "not_found");

    // A served adapter streams normally and names itself in the LoRAX headers.
    let r = client
        .post(server.url("/generate_stream"))
        .header("authorization", "Bearer secret-token")
        .json(&body("org/a"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-adapter-id"], "org/a");
    assert_eq!(r.headers()["x-adapter-source"], "hub");
    let text = r.text().await.expect("body");
    assert!(text.contains("generated_text\":\" org/a org/a"), "{text}");
    // The bearer token reached the shard as the adapter's api_token.
    let loads = shard.loads();
    let token = loads
        .iter()
        .find_map(|l| match l.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(medley_proto::shard::v1::adapter_spec::Kind::Single(r)) if r.id == "org/a" => {
                r.api_token.clone()
            }
            _ => None,
        });
    assert_eq!(token.as_deref(), Some("secret-token"));

    // Base requests carry no adapter headers.
    let r = client
        .post(server.url("/generate"))
        .json(&json!({"inputs": "hello", "parameters": {"max_new_tokens": 1}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-adapter-id").is_none());
}
