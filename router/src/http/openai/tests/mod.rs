//! OpenAI route tests over real loopback TCP against a [`FakeBackend`] (see its docs: token `i`
//! of a request is prompt token `i % len` with text `" t<id>"`; with the word tokenizer,
//! `"hello world"` is `[<s>=1, hello=3, world=4]`, so it generates `" t1 t3 t4 t1 ..."`).

mod chat;
mod completions;
mod errors;
mod stream;
mod templates;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::infer::testing::{FakeBackend, TestServer, test_limits};

/// A chat template that writes BOS, then each message's content followed by a space.
pub(super) const PLAIN_TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}";

/// A server whose `tokenizer_config.json` has `template` as its chat template (none: no file).
pub(super) async fn server(backend: FakeBackend, template: Option<&str>) -> TestServer {
    let config = template.map(|t| {
        json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": t})
            .to_string()
    });
    let files: Vec<(&str, &str)> = config
        .as_deref()
        .map(|c| vec![("tokenizer_config.json", c)])
        .unwrap_or_default();
    TestServer::start_in(backend, test_limits(), &files).await
}

/// Posts `body`; returns the status and the JSON reply.
pub(super) async fn post(server: &TestServer, path: &str, body: &Value) -> (StatusCode, Value) {
    let (status, _, reply) =
        super::super::tests::post_json(&server.url(path), &body.to_string()).await;
    (status, reply)
}

/// Posts `body` and collects the `data:` fields of the SSE reply (raw: `[DONE]` is not JSON).
pub(super) async fn post_stream(
    server: &TestServer,
    path: &str,
    body: &Value,
) -> (StatusCode, Vec<String>) {
    let resp = reqwest::Client::new()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let mut text = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
    }
    let data = text
        .split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect();
    (status, data)
}

/// The JSON chunks of a stream's data, checking that it ends with `[DONE]` (and only there).
pub(super) fn chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d:?}: {e}")))
        .collect()
}

/// Checks an OpenAI error reply.
pub(super) fn assert_error(
    (status, body): &(StatusCode, Value),
    expected_status: u16,
    code: Option<&str>,
    message_part: &str,
) {
    assert_eq!(status.as_u16(), expected_status, "{body}");
    let e = &body["error"];
    let kind = if expected_status < 500 && expected_status != 424 {
        "invalid_request_error"
    } else {
        "server_error"
    };
    if expected_status != 429 {
        assert_eq!(e["type"], kind, "{body}");
    }
    assert_eq!(e["code"], json!(code), "{body}");
    let message = e["message"].as_str().expect("a message");
    assert!(
        message.contains(message_part),
        "{message:?} lacks {message_part:?}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error`: {body}"
    );
}
