//! Streamed answers: chunk shapes, `[DONE]`, usage, n > 1, stop sequences, logprobs.

use serde_json::{Value, json};

use super::{PLAIN_TEMPLATE, chunks as json_chunks, post_stream, server};
use crate::infer::testing::{FakeBackend, TEST_MODEL_ID};

/// Text of every chunk of choice `index` (completions: `text`; chat: `delta.content`).
fn text_of(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"] == index)
        .filter_map(|c| {
            c.get("text")
                .or_else(|| c["delta"].get("content"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn completion_chunks_end_with_usage_and_done() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"model": TEST_MODEL_ID, "prompt": "hello world", "max_tokens": 3,
        "stream": true, "stream_options": {"include_usage": true}});
    let (status, data) = post_stream(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    let chunks = json_chunks(&data);
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["id"], id, "one id per stream");
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["model"], TEST_MODEL_ID);
    }
    assert_eq!(
        chunks[0]["choices"],
        json!([{"index": 0, "text": " t1", "logprobs": null, "finish_reason": null}])
    );
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(text_of(&chunks, 0), " t1 t3 t4");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(
        chunks[3]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    assert!(chunks[..3].iter().all(|c| c.get("usage").is_none()));
    server.stop().await;
}

#[tokio::test]
async fn chat_chunks_open_with_the_role_and_merge_n_choices() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let body = json!({"messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 2, "n": 2, "seed": 1, "stream": true});
    let (status, data) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let chunks = json_chunks(&data);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );
    for i in 0..2u64 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine.len(), 3, "role + 2 tokens: {mine:?}");
        assert_eq!(
            mine[0]["choices"][0],
            json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
        );
        assert_eq!(mine[1]["choices"][0]["delta"], json!({"content": " t1"}));
        assert_eq!(mine[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(text_of(&chunks, i), " t1 t3");
    }
    server.stop().await;
}

#[tokio::test]
async fn streamed_stop_sequences_are_never_sent() {
    let server = server(FakeBackend::new(), None).await;
    // Generates " t1 t3 t4 ..."; " t3 t4" spans two tokens, so " t3" is held back until it is
    // known to start the stop sequence.
    let body = json!({"prompt": "hello world", "max_tokens": 6, "stop": " t3 t4", "stream": true});
    let (status, data) = post_stream(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    let chunks = json_chunks(&data);
    assert_eq!(text_of(&chunks, 0), " t1");
    assert!(data.iter().all(|d| !d.contains("t3")), "{data:?}");
    assert_eq!(
        chunks.last().expect("chunks")["choices"][0]["finish_reason"],
        "stop"
    );
    server.stop().await;
}

#[tokio::test]
async fn streamed_logprobs_come_with_their_tokens() {
    let server = server(FakeBackend::new(), Some(PLAIN_TEMPLATE)).await;
    let body = json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2,
        "logprobs": true, "top_logprobs": 2, "stream": true});
    let (status, data) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let chunks = json_chunks(&data);
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    for (chunk, text) in chunks[1..].iter().zip([" t1", " t3"]) {
        let content = &chunk["choices"][0]["logprobs"]["content"];
        assert_eq!(content[0]["token"], text);
        assert_eq!(content[0]["top_logprobs"].as_array().map(Vec::len), Some(2));
    }
    let body = json!({"prompt": "hello world", "max_tokens": 2, "logprobs": 1, "stream": true});
    let (_, data) = post_stream(&server, "/v1/completions", &body).await;
    let chunks = json_chunks(&data);
    assert_eq!(
        chunks[1]["choices"][0]["logprobs"],
        json!({"tokens": [" t3"], "token_logprobs": [-0.5], "top_logprobs": [{" a1": -1.0}], "text_offset": [3]})
    );
    server.stop().await;
}
