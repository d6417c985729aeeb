//! Wire compatibility with the LoRAX Python client (`lorax-client` 0.6.3) and the TGI client it
//! descends from (`text-generation` 0.7.0): their `generate` and `generate_stream` POST to `/`,
//! expect a JSON array or `data:` SSE events, and map error bodies to their exception types.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;

use medley_e2e::{Server, ServerOptions, python_with_lorax_client, tiny_model_dir, workspace_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorax_client_generate_stream_and_errors() {
    client_check("lorax", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorax_client_works_with_two_tensor_parallel_shards() {
    client_check("lorax", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_client_generate_stream_and_errors() {
    client_check("tgi", 1).await;
}

/// Runs `tests/python/rest_client_check.py` with `client` (`lorax` or `tgi`) against a server of
/// the tiny model split over `num_shard` ranks.
async fn client_check(client: &'static str, num_shard: u32) {
    let python = python_with_lorax_client().expect("python with lorax-client");
    let s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec!["--num-shard".into(), num_shard.to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    let script = workspace_root().join("tests/python/rest_client_check.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(client)
            .arg(&s.http)
            .output()
            .map(|o| (o, s))
    })
    .await
    .unwrap()
    .unwrap();
    let (out, _server) = out;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{client} client check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}\n{stderr}");
}
