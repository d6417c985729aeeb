//! `/v1/chat/completions` (JSON): templates, content parts, logprobs, template errors.

use serde_json::json;

use super::{PLAIN_TEMPLATE, assert_error, post, server};
use crate::infer::testing::{FakeBackend, TEST_MODEL_ID};

fn user(content: serde_json::Value) -> serde_json::Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test]
async fn chat_renders_the_template_without_a_second_bos() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let body = json!({"model": TEST_MODEL_ID, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "system", "content": "hello"}, {"role": "user", "content": "world", "name": "bob"}]});
    let (status, reply) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(
        reply["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": " t1 t3 t4"},
            "logprobs": null, "finish_reason": "length"}])
    );
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    let r = &server.backend.requests()[0];
    assert_eq!(r.inputs, "<s>hello world ");
    assert_eq!(
        r.input_ids,
        vec![1, 3, 4],
        "the template's BOS, and no other"
    );
    server.stop().await;
}

#[tokio::test]
async fn text_parts_are_joined_and_other_parts_refused() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let parts = json!([{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]);
    let (status, reply) = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": user(parts), "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(server.backend.requests()[0].inputs, "<s>hello\nworld ");
    let image = json!([{"type": "image_url", "image_url": {"url": "data:,"}}]);
    let got = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": user(image)}),
    )
    .await;
    assert_error(&got, 400, None, "`image_url` are not supported");
    assert_eq!(got.1["error"]["param"], "messages");
    let got = post(&server, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_error(&got, 400, None, "`messages` must not be empty");
    let tools = json!({"messages": user(json!("hi")), "tools": [{"type": "function"}]});
    let got = post(&server, "/v1/chat/completions", &tools).await;
    assert_error(&got, 400, None, "`tools`");
    server.stop().await;
}

#[tokio::test]
async fn chat_logprobs_and_max_completion_tokens() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let body = json!({"messages": user(json!("hello world")), "max_tokens": 5,
        "max_completion_tokens": 2, "logprobs": true, "top_logprobs": 1});
    let (status, reply) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    let entry = |text: &str| {
        json!({"token": text, "logprob": -0.5, "bytes": text.as_bytes(),
            "top_logprobs": [{"token": " a1", "logprob": -1.0, "bytes": [32, 97, 49]}]})
    };
    assert_eq!(
        reply["choices"][0]["logprobs"],
        json!({"content": [entry(" t1"), entry(" t3")]})
    );
    assert_eq!(
        server.backend.requests()[0]
            .stopping_parameters
            .max_new_tokens,
        2
    );
    let plain = json!({"messages": user(json!("hello")), "max_tokens": 1, "logprobs": true});
    let (_, reply) = post(&server, "/v1/chat/completions", &plain).await;
    assert_eq!(
        reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        json!([])
    );
    let bad = json!({"messages": user(json!("hello")), "top_logprobs": 2});
    let got = post(&server, "/v1/chat/completions", &bad).await;
    assert_error(&got, 400, None, "needs `logprobs: true`");
    // More alternatives than the server returns name the chat parameter.
    let many = json!({"messages": user(json!("hello")), "logprobs": true, "top_logprobs": 6});
    let got = post(&server, "/v1/chat/completions", &many).await;
    assert_error(&got, 400, None, "`top_logprobs` must be <= 5. Given: 6");
    assert_eq!(got.1["error"]["param"], "top_logprobs");
    server.stop().await;
}

#[tokio::test]
async fn a_model_without_a_chat_template_is_400() {
    let server = server(FakeBackend::new(), None).await;
    let got = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": user(json!("hi"))}),
    )
    .await;
    assert_error(&got, 400, None, "this model has no chat template");
    // Completions need no template.
    let (status, _) = post(&server, "/v1/completions", &json!({"prompt": "hi"})).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn raise_exception_is_a_400_with_its_message() {
    let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}{{ messages[0]['content'] }}";
    let server = server(FakeBackend::new(), Some(template)).await;
    let body = json!({"messages": [{"role": "assistant", "content": "hi"}]});
    let got = post(&server, "/v1/chat/completions", &body).await;
    assert_error(
        &got,
        400,
        None,
        "Conversations must start with a user message",
    );
    assert_eq!(
        got.1["error"]["message"],
        "Conversations must start with a user message"
    );
    let ok = json!({"messages": user(json!("hello")), "max_tokens": 1});
    let (status, _) = post(&server, "/v1/chat/completions", &ok).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_broken_template_is_a_500() {
    let server = server(FakeBackend::new(), Some("{% for %}")).await;
    let got = post(
        &server,
        "/v1/chat/completions",
        &json!({"messages": user(json!("hi"))}),
    )
    .await;
    assert_error(&got, 500, None, "the model's chat template cannot be used");
    server.stop().await;
}
