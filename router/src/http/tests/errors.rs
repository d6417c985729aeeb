//! Every validation error is a 422 with the exact LoRAX body; body errors are 400/415/422 with the
//! same JSON shape.

use serde_json::{Value, json};

use super::post_json;
use crate::infer::testing::{FakeBackend, TestServer};

fn validation(message: &str) -> Value {
    json!({"error": format!("Input validation error: {message}"), "error_type": "validation"})
}

#[tokio::test]
async fn every_validation_error_is_422_with_its_message() {
    let server = TestServer::start(FakeBackend::new()).await;
    let long_prompt = vec!["hello"; 40].join(" ");
    let cases: Vec<(Value, &str)> = vec![
        (json!({"inputs": ""}), "`inputs` cannot be empty"),
        (
            json!({"inputs": "hi", "parameters": {"temperature": -1.0}}),
            "`temperature` must be >= 0. Given: -1",
        ),
        (
            json!({"inputs": "hi", "parameters": {"repetition_penalty": 0.0}}),
            "`repetition_penalty` must be strictly positive. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"frequency_penalty": 2.5}}),
            "`frequency_penalty` must be in [-2, 2]. Given: 2.5",
        ),
        (
            json!({"inputs": "hi", "parameters": {"frequency_penalty": 1e39}}),
            "`frequency_penalty` must be in [-2, 2]. Given: inf",
        ),
        (
            json!({"inputs": "hi", "parameters": {"presence_penalty": -3.0}}),
            "`presence_penalty` must be in [-2, 2]. Given: -3",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_p": 1.5}}),
            "`top_p` must be in (0, 1]. Given: 1.5",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_p": 0.0}}),
            "`top_p` must be in (0, 1]. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"typical_p": 1.0}}),
            "`typical_p` must be in (0, 1). Given: 1",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_k": 0}}),
            "`top_k` must be strictly positive. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"max_new_tokens": 0}}),
            "`max_new_tokens` must be strictly positive and <= 64. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"max_new_tokens": -5}}),
            "`max_new_tokens` must be strictly positive and <= 64. Given: -5",
        ),
        (
            json!({"inputs": "hello world", "parameters": {"max_new_tokens": 62}}),
            "`inputs` tokens + `max_new_tokens` must be <= 64. Given: 3 `inputs` tokens and 62 `max_new_tokens`",
        ),
        (
            json!({"inputs": long_prompt}),
            "`inputs` must have at most 32 tokens. Given: 41; set `truncate` to keep only the last tokens",
        ),
        (
            json!({"inputs": "hi", "parameters": {"truncate": 0}}),
            "`truncate` must be strictly positive and <= 32. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"truncate": 33}}),
            "`truncate` must be strictly positive and <= 32. Given: 33",
        ),
        (
            json!({"inputs": "hi", "parameters": {"return_k_alternatives": 6}}),
            "`return_k_alternatives` must be strictly positive and <= 5. Given: 6",
        ),
        (
            json!({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            "`stop` must have at most 4 sequences. Given: 5",
        ),
        (
            json!({"inputs": "hi", "parameters": {"stop": [""]}}),
            "`stop` sequences cannot be empty strings",
        ),
        (
            json!({"inputs": "hi", "parameters": {"best_of": 0}}),
            "`best_of` must be strictly positive. Given: 0",
        ),
        (
            json!({"inputs": "hi", "parameters": {"best_of": 2}}),
            "`best_of` > 1 is not supported by this server (given: 2); send several requests with different seeds instead",
        ),
        (
            json!({"inputs": "hi", "parameters": {"watermark": true}}),
            "`watermark` is not supported by this server; set it to false or omit it",
        ),
        (
            json!({"inputs": "hi", "parameters": {"response_format": {"type": "json_object", "schema": {}}}}),
            "`response_format` (constrained generation) is not supported by this server; omit it",
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "../org/lora", "adapter_source": "hub", "api_token": "t"}}),
            "adapter id `../org/lora` is not a valid hub repository id (`name` or `org/name`: letters, digits, '-', '_' and '.', without '--' or '..')",
        ),
        (
            json!({"inputs": "hi", "parameters": {"adapter_id": "x", "merged_adapters": {"ids": ["a"], "weights": [1.0]}}}),
            "at most one of `adapter_id` or `merged_adapters` may be provided",
        ),
    ];
    for (body, message) in cases {
        let (status, _, reply) = post_json(&server.url("/generate"), &body.to_string()).await;
        assert_eq!(status, 422, "{body}: {reply}");
        assert_eq!(reply, validation(message), "{body}");
    }
    assert!(
        server.backend.requests().is_empty(),
        "nothing invalid was scheduled"
    );
    // The base-model spellings pass.
    for id in ["", "__base_model__"] {
        let body = json!({"inputs": "hi", "parameters": {"adapter_id": id, "max_new_tokens": 1}});
        let (status, _, _) = post_json(&server.url("/generate"), &body.to_string()).await;
        assert_eq!(status, 200, "adapter_id {id:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn body_errors_have_the_lorax_shape() {
    let server = TestServer::start(FakeBackend::new()).await;
    let client = reqwest::Client::new();
    for route in ["/", "/generate", "/generate_stream", "/tokenize"] {
        let cases: [(&str, &str, u16, &str); 4] = [
            (
                "application/json",
                "{\"inputs\": ",
                400,
                "Failed to parse the request body as JSON",
            ),
            (
                "application/json",
                r#"{"inputs": ["hi"]}"#,
                422,
                "Failed to deserialize the JSON body into the target type",
            ),
            (
                "application/json",
                r#"{"parameters": {}}"#,
                422,
                "missing field `inputs`",
            ),
            (
                "text/plain",
                r#"{"inputs": "hi"}"#,
                415,
                "Expected request with `Content-Type: application/json`",
            ),
        ];
        for (content_type, body, status, needle) in cases {
            let resp = client
                .post(server.url(route))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), status, "{route} {body}");
            let reply: Value = resp.json().await.expect("a JSON error body");
            assert_eq!(reply["error_type"], "validation", "{route} {body}");
            let error = reply["error"].as_str().expect("error string");
            assert!(error.contains(needle), "{route} {body}: {error}");
        }
    }
    // A parameter of the wrong type names its path.
    let (status, _, reply) = post_json(
        &server.url("/generate"),
        r#"{"inputs": "hi", "parameters": {"top_k": "five"}}"#,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(reply["error_type"], "validation");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("parameters.top_k"),
        "{reply}"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_have_the_lorax_shape() {
    let server = TestServer::start(FakeBackend::new()).await;
    let client = reqwest::Client::new();
    let resp = client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "no route for GET /nope", "error_type": "not_found"})
    );
    let resp = client.get(server.url("/generate")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "method GET is not allowed on /generate", "error_type": "method_not_allowed"})
    );
    server.stop().await;
}
