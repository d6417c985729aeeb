//! `medley eval` end to end: the real binary against the real `medley serve` (tiny random model,
//! fixture adapters). The model's answers are gibberish, so this checks the wiring — requests for
//! the base model, an adapter and a ties merge go through, the JSON report has every system and
//! task with scores in [0, 1], the chart is written — and that a bad task file fails with its
//! line number.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::{Command, Output};

use medley_e2e::{Server, ServerOptions, binaries, fixture_adapters, tiny_model_dir};
use serde_json::{Value, json};

const MERGE: &str = r#"{"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 0.7], "merge_strategy": "ties", "density": 0.5}"#;

/// Runs `medley eval` with `args`.
fn medley_eval(args: &[&str]) -> Output {
    Command::new(binaries().unwrap().join("medley"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap()
}

fn write_task(path: &Path) {
    let lines: String = [
        json!({"prompt": "Once upon a time", "expected": "there", "score": "contains"}),
        json!({"prompt": "SELECT", "expected": "*", "score": "exact", "max_new_tokens": 2}),
        json!({"prompt": "Hello", "expected": "^\\w", "score": "regex", "stop": ["\n"]}),
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect();
    std::fs::write(path, lines).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_scores_base_adapter_and_merge_on_the_real_server() {
    let server = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--adapter-root".into(),
            fixture_adapters().display().to_string(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("story.jsonl");
    write_task(&task);
    let json_path = dir.path().join("eval.json");
    let chart_path = dir.path().join("eval.svg");
    let out = medley_eval(&[
        "--endpoint",
        &server.http,
        "--tasks",
        task.to_str().unwrap(),
        "--adapters",
        "strong_a_r8",
        "--adapter-source",
        "local",
        "--merge",
        MERGE,
        "--max-new-tokens",
        "4",
        "--concurrency",
        "3",
        "--json",
        json_path.to_str().unwrap(),
        "--json-details",
        "--chart",
        chart_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stderr.contains("9/9 requests"), "{stderr}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let labels: Vec<&str> = report["systems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    let merge_label = "ties d=0.5 w=1,0.7 [strong_a_r8+strong_b_r8_attn]";
    assert_eq!(labels, ["base", "strong_a_r8", merge_label]);
    assert_eq!(report["tasks"][0]["name"], "story");
    assert_eq!(report["tasks"][0]["examples"], 3);
    for system in report["systems"].as_array().unwrap() {
        let tasks = system["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0]["task"], "story");
        let score = tasks[0]["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{system}");
        assert_eq!(system["failed"], 0, "{system}");
    }
    assert_eq!(report["systems"][2]["kind"], "merge");
    // Every example got an answer (whatever the random model says).
    for detail in report["details"].as_array().unwrap() {
        for example in detail["examples"].as_array().unwrap() {
            assert!(example["output"].is_string(), "{detail}");
        }
    }
    for label in labels {
        assert!(stdout.contains(label), "{stdout}");
    }
    let svg = std::fs::read_to_string(&chart_path).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("ties w=1,0.7"),
        "{svg}"
    );
}

#[test]
fn a_bad_task_line_fails_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("broken.jsonl");
    std::fs::write(
        &task,
        "{\"prompt\": \"a\", \"expected\": \"b\", \"score\": \"exact\"}\n\n{\"prompt\": \"a\", \"expected\": \"b\", \"score\": \"fuzzy\"}\n",
    )
    .unwrap();
    // The file is checked before anything is sent: no server needed.
    let out = medley_eval(&[
        "--endpoint",
        "http://127.0.0.1:9",
        "--tasks",
        task.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("broken.jsonl:3: unknown score rule `fuzzy`"),
        "{stderr}"
    );
}
