//! Wire compatibility with the official OpenAI Python client (`openai`, pinned in
//! `tests/python/requirements.txt`): `/v1/models`, `/v1/completions` and `/v1/chat/completions`
//! (JSON and streamed, `n`/`seed`, logprobs, stop sequences, adapters as `model` and per-request
//! merges through `extra_body`), each compared with what `/generate` answers for the same
//! request, and the errors mapped to the client's exception types.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::process::Command;

use medley_e2e::{
    Server, ServerOptions, fixture_adapters, python_with_lorax_client, tiny_model_dir,
    tiny_model_with_chat_template, workspace_root,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_completions_chat_adapters_and_errors() {
    let python = python_with_lorax_client().expect("python with the openai client");
    // The tiny model with the Mistral template (plain text plus `<s>`/`</s>`, which the tiny
    // tokenizer has) and the fixture adapters; and the tiny model as committed, without a
    // template, for the chat error.
    let model = tiny_model_with_chat_template("mistral").unwrap();
    let model_id = model.path().display().to_string();
    let (chat_server, plain_server) = tokio::join!(
        Server::start(ServerOptions {
            model: Some(model.path().to_path_buf()),
            args: vec![
                "--adapter-root".into(),
                fixture_adapters().display().to_string(),
                "--max-input-length".into(),
                "128".into(),
                "--max-total-tokens".into(),
                "256".into(),
            ],
            ..Default::default()
        }),
        Server::start(ServerOptions {
            model: Some(tiny_model_dir()),
            ..Default::default()
        }),
    );
    let (chat_server, plain_server) = (chat_server.unwrap(), plain_server.unwrap());
    let script = workspace_root().join("tests/python/openai_client_check.py");
    let (http, plain_http) = (chat_server.http.clone(), plain_server.http.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([http, model_id, plain_http])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}\n{stderr}");
    drop((chat_server, plain_server, model));
}
