//! A request's `api_token` (LoRAX: the token that fetches private hub adapters) is used for
//! nothing else: it never appears in the server's output, the shards' logs included, even at
//! `RUST_LOG=trace`, nor in an error it answers with.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::{Server, ServerOptions, fixture_adapters, tiny_model_dir};
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_proto::v1::{GenerateParameters, GenerateRequest, MergedAdapters};
use serde_json::{Value, json};

/// Distinctive enough never to appear by chance.
const TOKEN: &str = "hf_medleyTokenProbe7Q2xZk9wVb";

fn params(adapter: Value) -> Value {
    let mut p = json!({"max_new_tokens": 2, "api_token": TOKEN});
    if let (Some(p), Some(a)) = (p.as_object_mut(), adapter.as_object()) {
        p.extend(a.clone());
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("medley.log");
    let mut s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: [
            "--adapter-root",
            &fixture_adapters().display().to_string(),
            "--max-input-length",
            "128",
            "--max-total-tokens",
            "256",
        ]
        .map(String::from)
        .to_vec(),
        // The shards inherit it; the launcher forwards their output into its own.
        env: vec![("RUST_LOG".into(), "trace".into())],
        log_file: Some(log.clone()),
        ..Default::default()
    })
    .await
    .unwrap();

    // (adapter fields, expected status); HF_HUB_OFFLINE=1: hub adapters not in the cache fail
    // fast with 404.
    let hub_merge = json!({"adapter_source": "hub", "merged_adapters": {
        "ids": ["medley-test/token-a", "medley-test/token-b"], "weights": [1.0, 1.0],
        "merge_strategy": "linear"}});
    let local_merge = json!({"adapter_source": "local", "merged_adapters": {
        "ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 0.5],
        "merge_strategy": "linear"}});
    let cases = [
        (
            json!({"adapter_id": "medley-test/not-cached", "adapter_source": "hub"}),
            404,
        ),
        (hub_merge, 404),
        (
            json!({"adapter_id": "strong_a_r8", "adapter_source": "local"}),
            200,
        ),
        (local_merge, 200),
        // Refused by validation.
        (
            json!({"adapter_id": "../escape", "adapter_source": "hub"}),
            422,
        ),
    ];
    for (adapter, status) in cases {
        let body = json!({"inputs": "Hello", "parameters": params(adapter.clone())});
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, status, "{adapter}: {}", r.body);
        assert!(!r.body.to_string().contains(TOKEN), "{}", r.body);
    }

    // LoRAX: the bearer token stands for `api_token` when the body has none (no API keys here).
    let r = s
        .client
        .post(format!("{}/generate", s.http))
        .bearer_auth(TOKEN)
        .json(
            &json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2,
            "adapter_id": "medley-test/bearer-only", "adapter_source": "hub"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap().contains(TOKEN));

    // The OpenAI route takes it in the body too.
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": "medley-test/openai-not-cached", "prompt": "Hello",
                "max_tokens": 2, "adapter_source": "hub", "api_token": TOKEN}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(!r.body.to_string().contains(TOKEN), "{}", r.body);

    // gRPC: a single hub adapter and a hub merge.
    let mut grpc = GenerationServiceClient::new(s.grpc_channel().await.unwrap());
    let requests = [
        GenerateParameters {
            adapter_id: Some("medley-test/grpc-not-cached".into()),
            adapter_source: Some("hub".into()),
            ..Default::default()
        },
        GenerateParameters {
            adapter_source: Some("hub".into()),
            merged_adapters: Some(MergedAdapters {
                ids: vec!["medley-test/grpc-a".into(), "medley-test/grpc-b".into()],
                weights: vec![1.0, 1.0],
                merge_strategy: Some("linear".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    for parameters in requests {
        let status = grpc
            .generate(GenerateRequest {
                inputs: "Hello".into(),
                parameters: Some(GenerateParameters {
                    api_token: Some(TOKEN.into()),
                    max_new_tokens: Some(2),
                    ..parameters
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(!format!("{status:?}").contains(TOKEN), "{status:?}");
    }

    s.stop().unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    // The capture holds what this test is about: trace-level lines, the shard's, and the
    // failed adapter loads.
    assert!(output.contains("TRACE"), "no trace output captured");
    assert!(output.contains("shard serving"), "no shard output captured");
    assert!(
        output.contains("medley-test/not-cached"),
        "the failed load is not logged"
    );
    let leaks: Vec<&str> = output.lines().filter(|l| l.contains(TOKEN)).collect();
    assert!(
        leaks.is_empty(),
        "the api_token is in {} log line(s), e.g.:\n{}",
        leaks.len(),
        leaks.iter().take(5).copied().collect::<Vec<_>>().join("\n")
    );
}
