//! Server-sent events: shapes, mid-stream errors, cancellation on disconnect, overload.

use std::time::Duration;

use serde_json::json;

use super::{first_event, lorax_client_base_body, post_json, post_sse};
use crate::config::Limits;
use crate::infer::testing::{Behavior, FakeBackend, TestServer, test_limits};

#[tokio::test]
async fn generate_stream_sends_one_event_per_token() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body =
        json!({"inputs": "hello world", "parameters": {"max_new_tokens": 3, "details": true}});
    let (status, headers, events) =
        post_sse(&server.url("/generate_stream"), &body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["x-prompt-tokens"], "3");
    let tok = |id: u32| json!({"id": id, "text": format!(" t{id}"), "logprob": -0.5, "special": false, "skipped": false});
    assert_eq!(
        events,
        vec![
            json!({"token": tok(1), "generated_text": null, "details": null}),
            json!({"token": tok(3), "generated_text": null, "details": null}),
            json!({"token": tok(4), "generated_text": " t1 t3 t4", "details": {
                "finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 3, "seed": null
            }}),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn compat_route_streams_the_lorax_client_body() {
    let server = TestServer::start(FakeBackend::new()).await;
    let (status, _, events) = post_sse(&server.url("/"), &lorax_client_base_body(true)).await;
    assert_eq!(status, 200);
    assert_eq!(events.len(), 16);
    let ids = &server.backend.requests()[0].input_ids;
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"], FakeBackend::expected_text(ids, 16));
    assert_eq!(last["details"]["prompt_tokens"], 19);
    assert!(
        events[..15]
            .iter()
            .all(|e| e["generated_text"].is_null() && e["details"].is_null())
    );
    server.stop().await;
}

#[tokio::test]
async fn stream_without_details_and_with_full_text() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body =
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2, "return_full_text": true}});
    let (_, _, events) = post_sse(&server.url("/generate_stream"), &body.to_string()).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["generated_text"], "hello t1 t3");
    assert!(events[1]["details"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn errors_midway_become_error_events() {
    let server = TestServer::start(FakeBackend::new().with_behavior(Behavior::FailAfter(1))).await;
    let body = json!({"inputs": "hello", "parameters": {"max_new_tokens": 3}});
    let (status, _, events) = post_sse(&server.url("/generate_stream"), &body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["token"]["id"], 1);
    assert_eq!(
        events[1],
        json!({"error": "Request failed during generation: fake shard failure", "error_type": "generation"})
    );
    // Without streaming the same failure is a 424.
    let (status, _, body) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 424);
    assert_eq!(body["error_type"], "generation");
    server.stop().await;
}

#[tokio::test]
async fn missing_end_is_an_incomplete_generation() {
    let server =
        TestServer::start(FakeBackend::new().with_behavior(Behavior::CloseWithoutEnd)).await;
    let body = json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}});
    let (_, _, events) = post_sse(&server.url("/generate_stream"), &body.to_string()).await;
    assert_eq!(
        events.last().unwrap(),
        &json!({"error": "Incomplete generation", "error_type": "incomplete_generation"})
    );
    let (status, _, body) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        json!({"error": "Incomplete generation", "error_type": "incomplete_generation"})
    );
    server.stop().await;
}

#[tokio::test]
async fn validation_errors_of_streams_are_http_errors() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body = json!({"inputs": "hello", "parameters": {"top_k": 0}, "stream": true});
    let (status, _, body) = post_json(&server.url("/"), &body.to_string()).await;
    assert_eq!(status, 422);
    assert_eq!(
        body["error"],
        "Input validation error: `top_k` must be strictly positive. Given: 0"
    );
    server.stop().await;
}

#[tokio::test]
async fn client_disconnect_cancels_the_backend_request_promptly() {
    // 300 ms between tokens: the backend must notice the disconnect while waiting for the second
    // token, i.e. the server drops the stream when the connection closes, not at its next write
    // (hyper sees the EOF within microseconds on loopback, so the margin is wide).
    let backend = FakeBackend::new().with_delay(Duration::from_millis(300));
    let server = TestServer::start(backend).await;
    let body = json!({"inputs": "hello", "parameters": {"max_new_tokens": 60}});
    let mut resp = reqwest::Client::new()
        .post(server.url("/generate_stream"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = first_event(&mut resp).await;
    assert_eq!(first["token"]["id"], 1);
    assert_eq!(server.backend.cancelled(), 0);
    drop(resp);
    server.backend.wait_cancelled(1).await;
    assert_eq!(server.backend.sent_before_cancel(), vec![1]);
    server.stop().await;
}

#[tokio::test]
async fn overload_is_429_until_the_stream_ends() {
    let limits = Limits {
        max_concurrent_requests: 1,
        ..test_limits()
    };
    let backend = FakeBackend::new().with_delay(Duration::from_millis(20));
    let server = TestServer::start_with(backend, limits).await;
    let mut resp = reqwest::Client::new()
        .post(server.url("/generate_stream"))
        .json(&json!({"inputs": "hello", "parameters": {"max_new_tokens": 60}}))
        .send()
        .await
        .unwrap();
    first_event(&mut resp).await;
    let quick = r#"{"inputs": "hello", "parameters": {"max_new_tokens": 1}}"#;
    let (status, _, body) = post_json(&server.url("/generate"), quick).await;
    assert_eq!(status, 429);
    assert_eq!(
        body,
        json!({"error": "Model is overloaded", "error_type": "overloaded"})
    );
    drop(resp);
    server.backend.wait_cancelled(1).await;
    let (status, _, _) = post_json(&server.url("/generate"), quick).await;
    assert_eq!(status, 200, "the permit was released with the stream");
    server.stop().await;
}
