//! End to end over the public gRPC API (`medley.v1`) with the generated tonic client, and with
//! Python's grpcio-reflection client (reflection v1alpha) as a new user would try it.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;

use medley_e2e::{Server, ServerOptions, python_with_lorax_client, tiny_model_dir, workspace_root};
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_proto::v1::{FinishReason, GenerateParameters, GenerateRequest, InfoRequest};
use serde_json::json;

fn request(inputs: &str, max_new_tokens: i64) -> GenerateRequest {
    GenerateRequest {
        inputs: inputs.into(),
        parameters: Some(GenerateParameters {
            max_new_tokens: Some(max_new_tokens),
            details: true,
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_generate_and_stream_match_http() {
    use futures::StreamExt;
    let s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = GenerationServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_dtype, "float32");

    let resp = client
        .generate(request("The quick brown fox", 10))
        .await
        .unwrap()
        .into_inner();
    let details = resp.details.expect("details");
    assert_eq!(details.generated_tokens, 10);
    assert_eq!(details.finish_reason(), FinishReason::Length);
    let ids: Vec<u32> = details.tokens.iter().map(|t| t.id).collect();

    // Same tokens over HTTP.
    let http = s
        .post("/generate", &json!({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 10, "details": true}}))
        .await
        .unwrap();
    let http_ids: Vec<u32> = http.body["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, http_ids);
    assert_eq!(http.body["generated_text"], resp.generated_text);

    // Streaming: one message per token, final one carries the text.
    let mut stream = client
        .generate_stream(request("The quick brown fox", 10))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = vec![];
    let mut last = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        streamed.push(msg.token.as_ref().unwrap().id);
        last = Some(msg);
    }
    assert_eq!(streamed, ids);
    assert_eq!(
        last.unwrap().generated_text.as_deref(),
        Some(resp.generated_text.as_str())
    );

    // Validation errors are INVALID_ARGUMENT with the same message as HTTP.
    let mut bad = request("hi", 5);
    if let Some(p) = bad.parameters.as_mut() {
        p.top_p = Some(2.0);
    }
    let err = client.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("top_p"), "{}", err.message());
    let err = client.generate(request("", 5)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_reflection_finds_and_calls_the_service() {
    let python = python_with_lorax_client().expect("python with the test requirements");
    let s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        ..Default::default()
    })
    .await
    .unwrap();
    let target = s.grpc.trim_start_matches("http://").to_string();
    let script = workspace_root().join("tests/python/grpc_reflection_check.py");
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).arg(script).arg(target).output())
            .await
            .unwrap()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ALL OK"), "{stdout}\n{stderr}");
}
