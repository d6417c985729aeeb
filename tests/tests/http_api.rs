//! End to end over HTTP: the real `medley serve` (launcher, shard process, router) on loopback
//! with the committed tiny model.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::{Server, ServerOptions, tiny_model_dir};
use serde_json::{Value, json};

async fn server() -> Server {
    Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--max-input-length".into(),
            "64".into(),
            "--max-total-tokens".into(),
            "128".into(),
        ],
        ..Default::default()
    })
    .await
    .expect("server starts")
}

fn greedy(inputs: &str, max_new_tokens: u32) -> Value {
    json!({"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens, "details": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_stream_and_compat_routes_agree() {
    let s = server().await;
    let r = s
        .post("/generate", &greedy("The quick brown fox", 12))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let details = &r.body["details"];
    assert_eq!(details["generated_tokens"], 12);
    assert_eq!(details["finish_reason"], "length");
    let tokens: Vec<u64> = details["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert_eq!(tokens.len(), 12);
    assert!(
        details["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["logprob"].as_f64().unwrap() <= 0.0)
    );
    let text = r.body["generated_text"].as_str().unwrap().to_string();

    // Same request through SSE: same tokens, same final text, final event carries details.
    let events = s
        .sse("/generate_stream", &greedy("The quick brown fox", 12))
        .await
        .unwrap();
    assert_eq!(events.len(), 12);
    let streamed: Vec<u64> = events
        .iter()
        .map(|e| e["token"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(streamed, tokens);
    assert!(
        events[..11]
            .iter()
            .all(|e| e["generated_text"].is_null() && e["details"].is_null())
    );
    assert_eq!(events[11]["generated_text"], text);
    assert_eq!(events[11]["details"]["finish_reason"], "length");

    // LoRAX compat route: JSON array reply, and SSE with stream=true.
    let mut compat = greedy("The quick brown fox", 12);
    compat["stream"] = json!(false);
    let r = s.post("/", &compat).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body[0]["generated_text"], text);
    compat["stream"] = json!(true);
    let events = s.sse("/", &compat).await.unwrap();
    assert_eq!(events.last().unwrap()["generated_text"], text);

    // return_full_text prepends the prompt; decoder_input_details returns the prompt tokens.
    let r = s
        .post(
            "/generate",
            &json!({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "details": true, "decoder_input_details": true, "return_full_text": true}}),
        )
        .await
        .unwrap();
    assert_eq!(
        r.body["generated_text"],
        format!("The quick brown fox{text}")
    );
    let prefill = r.body["details"]["prefill"].as_array().unwrap();
    assert_eq!(
        prefill.len() as u64,
        r.body["details"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(prefill[0]["logprob"].is_null());
    assert!(
        prefill[1..]
            .iter()
            .all(|t| t["logprob"].as_f64().unwrap() <= 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_and_seeds() {
    let s = server().await;
    // Find a printable piece of the greedy output to use as a stop sequence.
    let r = s
        .post("/generate", &greedy("Once upon a time", 30))
        .await
        .unwrap();
    let tokens = r.body["details"]["tokens"].as_array().unwrap().clone();
    let (idx, stop) = tokens
        .iter()
        .enumerate()
        .skip(2)
        .find_map(|(i, t)| {
            let text = t["text"].as_str()?;
            (text.trim().len() >= 2 && text.is_ascii()).then(|| (i, text.to_string()))
        })
        .expect("a printable token in 30 greedy tokens");
    let mut body = greedy("Once upon a time", 30);
    body["parameters"]["stop"] = json!([stop]);
    let r = s.post("/generate", &body).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["details"]["finish_reason"], "stop_sequence");
    assert!(r.body["details"]["generated_tokens"].as_u64().unwrap() <= idx as u64 + 1);
    assert!(
        r.body["generated_text"]
            .as_str()
            .unwrap()
            .ends_with(stop.as_str())
    );

    // Sampling with a seed is reproducible; another seed gives another sample.
    let sample = |seed: u64| json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 16, "do_sample": true, "temperature": 1.5, "seed": seed, "details": true}});
    let ids = |v: &Value| -> Vec<u64> {
        v["details"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    };
    let a = s.post("/generate", &sample(42)).await.unwrap();
    let b = s.post("/generate", &sample(42)).await.unwrap();
    let c = s.post("/generate", &sample(43)).await.unwrap();
    assert_eq!(a.body["details"]["seed"], 42);
    assert_eq!(ids(&a.body), ids(&b.body));
    assert_ne!(ids(&a.body), ids(&c.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let s = server().await;
    let long_prompt = "word ".repeat(200);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"inputs": ""}), 422, "`inputs` cannot be empty"),
        (
            json!({"inputs": "hi", "parameters": {"max_new_tokens": 0}}),
            422,
            "max_new_tokens",
        ),
        (
            json!({"inputs": "hi", "parameters": {"max_new_tokens": 100000}}),
            422,
            "max_new_tokens",
        ),
        (
            json!({"inputs": long_prompt, "parameters": {"max_new_tokens": 4}}),
            422,
            "inputs",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_p": 1.5}}),
            422,
            "top_p",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_p": 0.0}}),
            422,
            "top_p",
        ),
        (
            json!({"inputs": "hi", "parameters": {"temperature": -1.0}}),
            422,
            "temperature",
        ),
        (
            json!({"inputs": "hi", "parameters": {"top_k": 0}}),
            422,
            "top_k",
        ),
        (
            json!({"inputs": "hi", "parameters": {"repetition_penalty": 0.0}}),
            422,
            "repetition_penalty",
        ),
        (
            json!({"inputs": "hi", "parameters": {"typical_p": 1.0}}),
            422,
            "typical_p",
        ),
        (
            json!({"inputs": "hi", "parameters": {"truncate": 0}}),
            422,
            "truncate",
        ),
        (
            json!({"inputs": "hi", "parameters": {"max_new_tokens": "ten"}}),
            422,
            "",
        ),
        (json!({"inputs": 5}), 422, ""),
        (json!({"parameters": {}}), 422, ""),
        (
            json!({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
            422,
            "stop",
        ),
    ];
    for (body, status, needle) in cases {
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        assert_eq!(r.body["error_type"], "validation", "{body}: {:?}", r.body);
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    // Malformed JSON and a wrong content type keep the JSON error shape.
    let r = s
        .post_raw("/generate", "application/json", "{not json".into())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error_type"], "validation");
    let r = s
        .post_raw("/generate", "text/plain", "{}".into())
        .await
        .unwrap();
    assert_eq!(r.status, 415);
    // A long prompt is fine with truncate: only its last tokens are kept.
    let r = s
        .post("/generate", &json!({"inputs": long_prompt, "parameters": {"max_new_tokens": 4, "truncate": 16, "details": true}}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["details"]["prompt_tokens"], 16);
    // The server is still healthy after all of that.
    assert_eq!(s.get("/health").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_stops_generation() {
    use futures::StreamExt;
    // Room for 1000 new tokens: far more than can be generated before the disconnect is seen.
    let s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--max-input-length".into(),
            "64".into(),
            "--max-total-tokens".into(),
            "1024".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000, "ignore_eos_token": true}});
    let r = reqwest::Client::new()
        .post(format!("{}/generate_stream", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    drop(stream);
    // The request must be dropped from the batch (counted as cancelled, not finished).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let cancelled = s
            .metric("medley_request_cancelled")
            .await
            .unwrap()
            .unwrap_or(0.0);
        let batch = s
            .metric("medley_batch_current_size")
            .await
            .unwrap()
            .unwrap_or(0.0);
        if cancelled >= 1.0 && batch == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cancel not seen: cancelled={cancelled} batch={batch}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Generation stopped: far fewer decode steps ran than the 1000 tokens asked for.
    let steps = s
        .metric_labeled("medley_batch_inference_duration_count", "method=\"decode\"")
        .await
        .unwrap()
        .unwrap_or(0.0);
    assert!(steps < 500.0, "{steps} decode steps after the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_tokenize_and_metrics() {
    let s = server().await;
    let (status, info) = s.get("/info").await.unwrap();
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["max_input_length"], 64);
    assert_eq!(info["max_total_tokens"], 128);
    assert_eq!(info["model_dtype"], "float32");
    let r = s
        .post("/tokenize", &json!({"inputs": "Hello world"}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body[0]["id"], 1, "BOS first: {:?}", r.body);
    s.post("/generate", &greedy("hi", 2)).await.unwrap();
    assert!(
        s.metric("medley_request_success")
            .await
            .unwrap()
            .unwrap_or(0.0)
            >= 1.0
    );
    // The decode step's parts: the shard's whole step holds its forward pass and sampling.
    // (The router's wait may be shorter: the shard runs a step ahead before it is asked.)
    let s = &s;
    let sum = |name: &'static str| async move {
        let sum = s.metric_labeled(name, "method=\"decode\"").await.unwrap();
        sum.unwrap_or_else(|| panic!("no {name}{{method=\"decode\"}} in /metrics"))
    };
    let router = sum("medley_batch_inference_duration_sum").await;
    let shard = sum("medley_batch_shard_duration_sum").await;
    let forward = sum("medley_batch_forward_duration_sum").await;
    let decode = sum("medley_batch_decode_duration_sum").await;
    assert!(
        forward > 0.0 && decode > 0.0,
        "forward {forward}, decode {decode}"
    );
    assert!(
        forward + decode <= shard,
        "{forward} + {decode} > shard step {shard}"
    );
    assert!(router > 0.0, "the router's wait {router}");
}
