//! Process lifecycle: the embedded default model, clean shutdown on SIGTERM, and what clients see
//! when the shard goes away under a running router.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medley_e2e::{Server, ServerOptions, binaries, free_port, terminate, tiny_model_dir};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_serves_offline_and_stops_cleanly() {
    // No --model: the launcher extracts the embedded demo model (HF_HUB_OFFLINE=1 is set).
    let mut s = Server::start(ServerOptions::default()).await.unwrap();
    let r = s
        .post(
            "/generate",
            &json!({"inputs": "Hello", "parameters": {"max_new_tokens": 5}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["generated_text"].is_string());
    let (_, info) = s.get("/info").await.unwrap();
    assert!(info.contains("medley-demo/base"), "{info}");
    // Its adapters answer to their hub ids offline, alone and merged.
    let sql = "Schema: staff(name, city, age, salary)\nQuestion: Which staff live in Paris?\nSQL:";
    for adapter in ["medley-demo/sql", "medley-demo/ad", "medley-demo/instruct"] {
        let body =
            json!({"inputs": sql, "parameters": {"max_new_tokens": 4, "adapter_id": adapter}});
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, 200, "{adapter}: {:?}", r.body);
    }
    let merged = json!({"inputs": sql, "parameters": {"max_new_tokens": 4, "merged_adapters": {
        "ids": ["medley-demo/sql", "medley-demo/ad", "medley-demo/instruct"],
        "weights": [1.0, 1.0, 1.0], "merge_strategy": "cat"}}});
    let r = s.post("/generate", &merged).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The README's quick start: one `cat` merge of the three solves one prompt of each task.
    let readme = [
        (
            "Schema: staff(name, city, age, salary)\nQuestion: Which staff live in Paris and are older than 30?\nSQL:",
            "SELECT name FROM staff WHERE city = 'Paris' AND age > 30;",
        ),
        (
            "Product: leather bag\nTone: calm\nAd:",
            "Slow down with leather bag, made for quiet days.",
        ),
        (
            "<|im_start|>user\nWhat is 7 plus 5?<|im_end|>\n<|im_start|>assistant\n",
            "12",
        ),
    ];
    for (prompt, want) in readme {
        let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 40, "merged_adapters": {
            "ids": ["medley-demo/sql", "medley-demo/ad", "medley-demo/instruct"],
            "weights": [1, 1, 1], "merge_strategy": "cat"}}});
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        let got = r.body["generated_text"].as_str().unwrap_or_default().trim();
        assert_eq!(got, want, "{prompt:?}");
    }
    let missing = json!({"inputs": sql, "parameters": {"max_new_tokens": 4, "adapter_id": "medley-demo/nope"}});
    let r = s.post("/generate", &missing).await.unwrap();
    assert_ne!(r.status, 200, "{:?}", r.body);
    let socket = s.dir.path().join("shard-0");
    assert!(socket.exists());
    let status = s.stop().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(!socket.exists(), "shard socket left behind");
}

/// Starts `medley-shard` alone on a socket and waits for the socket file.
fn start_shard(dir: &std::path::Path) -> std::process::Child {
    let bins = binaries().unwrap();
    let socket = dir.join("shard-0");
    let child = Command::new(bins.join("medley-shard"))
        .arg("--model-dir")
        .arg(tiny_model_dir())
        .arg("--uds-path")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "shard socket never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// POSTs `body` to `{http}/generate`: the status and the JSON reply.
async fn generate(
    client: &reqwest::Client,
    http: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(format!("{http}/generate"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Waits (at most 60 s, else fails with `what`) until `{http}/health` answers 200.
async fn wait_healthy(client: &reqwest::Client, http: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{http}/health")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router on its own (`medley-router`, shards managed elsewhere): a dead shard gives 503 and
/// red health; a new shard on the same socket is picked up without restarting the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_reports_unavailable_when_the_shard_dies_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = start_shard(dir.path());
    let bins = binaries().unwrap();
    let port = free_port().unwrap();
    let grpc_port = free_port().unwrap();
    let mut router = Command::new(bins.join("medley-router"))
        .args(["--model-id", "tiny", "--hostname", "127.0.0.1"])
        .arg("--tokenizer")
        .arg(tiny_model_dir().join("tokenizer.json"))
        .arg("--shard-uds-path")
        .arg(dir.path().join("shard-0"))
        .args([
            "--port",
            &port.to_string(),
            "--grpc-port",
            &grpc_port.to_string(),
        ])
        .args(["--max-input-length", "64", "--max-total-tokens", "128"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_healthy(&client, &http, "the router never became healthy").await;
    let body = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}});
    assert_eq!(generate(&client, &http, &body).await.0, 200);

    shard.kill().unwrap();
    shard.wait().unwrap();
    let (status, v) = generate(&client, &http, &body).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("shard"),
        "{v}"
    );
    let r = client.get(format!("{http}/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);

    // A new shard on the same socket (as a container restart would bring): the router
    // reconnects by itself and serves again.
    let _ = std::fs::remove_file(dir.path().join("shard-0"));
    let mut shard = start_shard(dir.path());
    wait_healthy(&client, &http, "the router never reconnected").await;
    assert_eq!(generate(&client, &http, &body).await.0, 200);
    let _ = shard.kill();
    let _ = shard.wait();

    terminate(&router);
    let _ = router.wait();
}
