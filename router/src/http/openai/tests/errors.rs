//! OpenAI-shaped errors: body errors, validation, refused features, unknown models.

use serde_json::json;

use super::{PLAIN_TEMPLATE, assert_error, post, post_stream, server};
use crate::infer::testing::{Behavior, FakeBackend, TEST_MODEL_ID};

#[tokio::test]
async fn body_errors_are_400_in_openai_shape() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let client = reqwest::Client::new();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let send = |body: &'static str, content_type: &'static str| {
            client
                .post(server.url(path))
                .header("content-type", content_type)
                .body(body)
                .send()
        };
        for (body, content_type, status) in [
            ("{not json", "application/json", 400),
            (
                r#"{"prompt": "a", "messages": [], "max_tokens": "many"}"#,
                "application/json",
                400,
            ),
            (r#"{"prompt": "a"}"#, "text/plain", 415),
        ] {
            let resp = send(body, content_type).await.expect("request");
            let got = (resp.status(), resp.json().await.expect("json"));
            let code = (status == 415).then_some("validation");
            assert_error(&got, status, code, "");
        }
    }
    assert!(server.backend.requests().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn invalid_and_unsupported_parameters_are_400() {
    let server = server(FakeBackend::new(), None).await;
    let cases = [
        (json!({"prompt": "hi", "n": 0}), "n", "`n` must be >= 1"),
        (json!({"prompt": "hi", "n": 9}), "n", "must be <= 8"),
        (
            json!({"prompt": "hi", "echo": true}),
            "echo",
            "`echo` is not supported",
        ),
        (json!({"prompt": "hi", "suffix": "x"}), "suffix", "`suffix`"),
        (
            json!({"prompt": "hi", "logit_bias": {"1": 5}}),
            "logit_bias",
            "`logit_bias`",
        ),
        (
            json!({"prompt": "hi", "logprobs": -1}),
            "logprobs",
            "`logprobs` must be >= 0",
        ),
        (json!({"prompt": [1, 2]}), "prompt", "token-id prompts"),
        (
            json!({"prompt": "hi", "model": "org/a", "adapter_id": "org/b"}),
            "model",
            "cannot be set too",
        ),
    ];
    for (body, param, message) in cases {
        let got = post(&server, "/v1/completions", &body).await;
        assert_error(&got, 400, None, message);
        assert_eq!(got.1["error"]["param"], param, "{body}");
    }
    // Validation errors of the shared pipeline (422 on the LoRAX routes) are 400 here, naming
    // the OpenAI parameter at fault where there is one.
    let validation = [
        (
            json!({"prompt": "hi", "temperature": -1}),
            "`temperature` must be >= 0",
            json!("temperature"),
        ),
        (
            json!({"prompt": "hi", "max_tokens": 0}),
            "`max_tokens` must be strictly positive",
            json!("max_tokens"),
        ),
        (
            json!({"prompt": "hi", "presence_penalty": 3}),
            "`presence_penalty` must be in [-2, 2]",
            json!("presence_penalty"),
        ),
        (
            json!({"prompt": "hi", "stop": ["a", ""]}),
            "`stop` sequences cannot be empty strings",
            json!("stop"),
        ),
        (
            json!({"prompt": "hi", "best_of": 2}),
            "`best_of` > 1 is not supported",
            json!("best_of"),
        ),
        (
            json!({"prompt": "hi", "response_format": {"type": "json_object"}}),
            "`response_format`",
            json!("response_format"),
        ),
        (
            json!({"prompt": "hi", "logprobs": 6}),
            "`logprobs` must be <= 5. Given: 6",
            json!("logprobs"),
        ),
        (
            json!({"prompt": ""}),
            "`prompt` cannot be empty",
            json!("prompt"),
        ),
        (
            json!({"prompt": "hi", "adapter_source": "gcs"}),
            "gcs",
            json!(null),
        ),
    ];
    for (body, message, param) in validation {
        let got = post(&server, "/v1/completions", &body).await;
        assert_error(&got, 400, None, message);
        assert_eq!(got.1["error"]["param"], param, "{body}");
    }
    assert!(server.backend.requests().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn unknown_models_are_404_model_not_found() {
    let server = server(
        FakeBackend::new().with_behavior(Behavior::AdaptersNotFound),
        Some(PLAIN_TEMPLATE),
    )
    .await;
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
    let cases = [
        (
            "/v1/completions",
            json!({"model": "org/missing", "prompt": "hello"}),
        ),
        ("/v1/chat/completions", chat("org/missing")),
        (
            "/v1/completions",
            json!({"model": "bad/id/with/slashes", "prompt": "hello"}),
        ),
    ];
    for (path, body) in &cases {
        let got = post(&server, path, body).await;
        assert_error(&got, 404, Some("model_not_found"), "does not exist");
        assert_eq!(got.1["error"]["param"], "model");
        // Streaming: the same 404 before any event.
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let resp = reqwest::Client::new()
            .post(server.url(path))
            .json(&stream)
            .send()
            .await
            .expect("request");
        let got = (
            resp.status(),
            resp.json().await.expect("a JSON error, not a stream"),
        );
        let model = body["model"].as_str().expect("a model");
        assert_error(&got, 404, Some("model_not_found"), model);
    }
    // An unknown `adapter_id` extra with the base model is also `model_not_found`.
    let body = json!({"model": TEST_MODEL_ID, "prompt": "hello", "adapter_id": "org/missing"});
    let got = post(&server, "/v1/completions", &body).await;
    assert_error(&got, 404, Some("model_not_found"), "org/missing");
    // The base model still works.
    let (status, reply) = post(&server, "/v1/chat/completions", &chat(TEST_MODEL_ID)).await;
    assert_eq!(status, 200, "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn overload_and_failures_keep_their_status() {
    let server = server(
        FakeBackend::new().with_behavior(Behavior::RejectSchedule),
        None,
    )
    .await;
    let got = post(&server, "/v1/completions", &json!({"prompt": "hello"})).await;
    assert_error(
        &got,
        503,
        Some("service_unavailable"),
        "fake backend rejects",
    );
    server.stop().await;

    let server = server_failing().await;
    let got = post(&server, "/v1/completions", &json!({"prompt": "hello"})).await;
    assert_error(&got, 424, Some("generation"), "fake shard failure");
    // Midway through a stream: an error event, and no [DONE].
    let body = json!({"prompt": "hello", "max_tokens": 4, "stream": true});
    let (status, data) = post_stream(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    assert_eq!(data.len(), 2, "{data:?}");
    let error: serde_json::Value = serde_json::from_str(&data[1]).expect("json");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(error["error"]["code"], "generation");
    server.stop().await;
}

async fn server_failing() -> crate::infer::testing::TestServer {
    server(
        FakeBackend::new().with_behavior(Behavior::FailAfter(1)),
        None,
    )
    .await
}

#[tokio::test]
async fn requests_past_the_context_are_context_length_exceeded() {
    // The test limits: prompts of at most 32 tokens, 64 tokens with the completion.
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let words = |n: usize| vec!["hi"; n].join(" ");
    for (body, message) in [
        (
            json!({"prompt": words(20), "max_tokens": 60}),
            "This model's maximum context length is 64 tokens",
        ),
        (
            json!({"prompt": words(40), "max_tokens": 4}),
            "This model's maximum prompt length is 32 tokens",
        ),
    ] {
        let got = post(&server, "/v1/completions", &body).await;
        assert_error(&got, 400, Some("context_length_exceeded"), message);
        assert_eq!(got.1["error"]["param"], json!(null), "{body}");
    }
    assert!(server.backend.requests().is_empty());
    server.stop().await;
}
