//! REST front tests over real loopback TCP against a [`FakeBackend`].

mod access;
mod adapters;
mod errors;
mod generate;
mod merges;
mod stream;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// The exact body lorax-client 0.6.3 sends for `generate(..., merged_adapters=...)`
/// (merge-semantics.md §6.3; 818 bytes on the wire).
pub(super) const LORAX_CLIENT_MERGED_BODY: &str = r#"{"inputs": "<s><|im_start|>user\nWrite an essay about Generative AI.<|im_end|>\n<|im_start|>assistant \n", "parameters": {"adapter_id": null, "adapter_source": null, "merged_adapters": {"ids": ["smangrul/tinyllama_lora_norobots", "smangrul/tinyllama_lora_sql", "smangrul/tinyllama_lora_adcopy"], "weights": [2.0, 0.3, 0.7], "merge_strategy": "ties", "density": 0.2, "majority_sign_method": "total"}, "api_token": null, "do_sample": false, "max_new_tokens": null, "ignore_eos_token": false, "repetition_penalty": null, "return_full_text": false, "stop": [], "seed": null, "temperature": null, "top_k": null, "top_p": null, "truncate": null, "typical_p": null, "best_of": null, "watermark": false, "details": true, "decoder_input_details": false, "return_k_alternatives": null, "response_format": null}, "stream": false}"#;

/// The same body as lorax-client sends it for the base model (`merged_adapters` null).
pub(super) fn lorax_client_base_body(stream: bool) -> String {
    let merged = r#"{"ids": ["smangrul/tinyllama_lora_norobots", "smangrul/tinyllama_lora_sql", "smangrul/tinyllama_lora_adcopy"], "weights": [2.0, 0.3, 0.7], "merge_strategy": "ties", "density": 0.2, "majority_sign_method": "total"}"#;
    assert!(LORAX_CLIENT_MERGED_BODY.contains(merged));
    LORAX_CLIENT_MERGED_BODY
        .replace(merged, "null")
        .replace(r#""stream": false"#, &format!(r#""stream": {stream}"#))
}

/// Posts a raw JSON body; returns status, headers and the parsed JSON reply.
pub(super) async fn post_json(url: &str, body: &str) -> (StatusCode, HeaderMap, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, headers, json)
}

/// Parses a complete SSE body into the JSON of each `data:` field (comments and blank lines skipped).
pub(super) fn parse_sse(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| {
            serde_json::from_str(data.trim_start())
                .unwrap_or_else(|e| panic!("bad event {data:?}: {e}"))
        })
        .collect()
}

/// Reads from a streaming response until one complete `data:` event has arrived.
pub(super) async fn first_event(resp: &mut reqwest::Response) -> Value {
    let mut buf = String::new();
    loop {
        let chunk = resp
            .chunk()
            .await
            .expect("chunk")
            .expect("stream ended before an event");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        if let Some(end) = buf.find("\n\n") {
            let events = parse_sse(&buf[..end + 2]);
            if let Some(first) = events.into_iter().next() {
                return first;
            }
            buf.drain(..end + 2);
        }
    }
}

/// Posts and collects all SSE events of the reply.
pub(super) async fn post_sse(url: &str, body: &str) -> (StatusCode, HeaderMap, Vec<Value>) {
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let mut text = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
    }
    (status, headers, parse_sse(&text))
}
