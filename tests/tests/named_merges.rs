//! Named merges end to end: a merge registered from `--merges` (YAML) or `POST /v1/merges`,
//! used as the OpenAI `model` and as the LoRAX `adapter_id`, gives the same greedy tokens as the
//! equivalent inline `merged_adapters` request on `/generate`, and all of them share one merge on
//! the shards (the adapter cache-miss counter moves once).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::{Server, ServerOptions, fixture_adapters, tiny_model_dir, token_ids};
use serde_json::{Value, json};

fn spec() -> Value {
    json!({"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 0.7],
           "merge_strategy": "ties", "density": 0.5})
}

async fn server(merges_file: &std::path::Path) -> Server {
    Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--adapter-root".into(),
            fixture_adapters().display().to_string(),
            "--default-adapter-source".into(),
            "local".into(),
            "--merges".into(),
            merges_file.display().to_string(),
        ],
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Greedy `/generate` of 8 tokens with `adapter` fields: the reply (with details).
async fn generate_reply(s: &Server, adapter: Value) -> Value {
    let mut parameters = json!({"max_new_tokens": 8, "details": true});
    parameters
        .as_object_mut()
        .unwrap()
        .extend(adapter.as_object().unwrap().clone());
    let r = s
        .post(
            "/generate",
            &json!({"inputs": "Once upon a time", "parameters": parameters}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The token ids of [`generate_reply`].
async fn generate(s: &Server, adapter: Value) -> Vec<u64> {
    token_ids(&generate_reply(s, adapter).await)
}

/// The text of [`generate_reply`].
async fn generated_text(s: &Server, adapter: Value) -> String {
    generate_reply(s, adapter).await["generated_text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Greedy `/v1/completions` with `model`: the text.
async fn complete(s: &Server, model: &str) -> String {
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": model, "prompt": "Once upon a time", "max_tokens": 8,
                    "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_merge_is_the_inline_merge_and_shares_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("merges.yaml");
    std::fs::write(
        &file,
        "merges:\n  - name: story/ties\n    merged_adapters:\n      ids: [strong_a_r8, strong_b_r8_attn]\n      weights: [1.0, 0.7]\n      merge_strategy: ties\n      density: 0.5\n",
    )
    .unwrap();
    let s = server(&file).await;
    let misses = "medley_adapter_cache_misses";
    let before = s.metric(misses).await.unwrap().unwrap_or(0.0);

    // The name on the OpenAI route, then the inline spec on /generate: one merge.
    let by_name = complete(&s, "story/ties").await;
    let inline = generated_text(&s, json!({"merged_adapters": spec()})).await;
    assert_eq!(by_name, inline);
    let by_adapter_id = generated_text(&s, json!({"adapter_id": "story/ties"})).await;
    assert_eq!(by_adapter_id, inline);
    assert_eq!(s.metric(misses).await.unwrap(), Some(before + 1.0));
    // ... and the merge is not the base model.
    let base = generate(&s, json!({})).await;
    assert_ne!(
        generate(&s, json!({"adapter_id": "story/ties"})).await,
        base
    );

    // A merge registered at run time works the same way, and is listed as a model.
    let r = s
        .post(
            "/v1/merges",
            &json!({"name": "runtime", "merged_adapters": {"ids": ["strong_a_r8"],
                    "weights": [1.0]}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let (_, models) = s.get("/v1/models").await.unwrap();
    assert!(
        models.contains("\"runtime\"") && models.contains("\"story/ties\""),
        "{models}"
    );
    assert_eq!(
        complete(&s, "runtime").await,
        generated_text(
            &s,
            json!({"merged_adapters": {"ids": ["strong_a_r8"], "weights": [1.0]}})
        )
        .await
    );
    // Deleted: the name is no longer a model (404 model_not_found on the OpenAI route).
    let (status, _) = s.delete("/v1/merges/runtime").await.unwrap();
    assert_eq!(status, 200);
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": "runtime", "prompt": "x", "max_tokens": 1}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "model_not_found", "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_merges_file_stops_the_server_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("merges.json");
    std::fs::write(
        &file,
        r#"[{"name": "m", "merged_adapters": {"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0]}}]"#,
    )
    .unwrap();
    let out = std::process::Command::new(medley_e2e::binaries().unwrap().join("medley"))
        .args(["serve", "--port", "0", "--grpc-port", "0", "--merges"])
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("merge \"m\"") && text.contains("one weight per adapter id"),
        "{text}"
    );
}
