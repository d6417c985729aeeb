//! `medley eval` against a fake `/generate` (axum on 127.0.0.1:0) whose answers are a known
//! function of the request, so every score of the table is known exactly.
//!
//! The fake "knows" the first `floor(4 f)` examples of a task, with `f` by system:
//! base: sql 0.25, chat 0; adapter `sql`: sql 1, chat 0.25; adapter `chat`: sql 0, chat 1;
//! a `linear` merge: 0.5 on both; `ties` at density d: d on both; `dare_ties`: sql 1, chat d.
//! Weights below 1 halve `f`. Any `bogus` adapter is a 400, any `dare_linear` merge a 422. Requests must be greedy with seed 1234
//! and `adapter_source: local`, or the fake answers 422. Later examples answer sooner, so
//! completions come back out of order.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use medley_eval::{EvalArgs, EvalError, Report};
use serde_json::{Value, json};

const EXAMPLES: usize = 4;
/// What the fake says to any `dare_linear` merge, with a 422 (as Medley does to a merge its
/// adapters cannot make, e.g. `linear` over adapters of different ranks).
const REFUSAL: &str = "cannot merge [sql, chat]: the adapters have ranks [8, 16], but merge \
                       strategy dare_linear needs equal ranks";

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: EvalArgs,
}

fn fraction(params: &Value, task: &str) -> Result<f64, String> {
    let sql = task == "sql";
    if let Some(id) = params["adapter_id"].as_str() {
        return match id {
            "sql" => Ok(if sql { 1.0 } else { 0.25 }),
            "chat" => Ok(if sql { 0.0 } else { 1.0 }),
            other => Err(format!("adapter `{other}` not found")),
        };
    }
    let merge = &params["merged_adapters"];
    if merge.is_null() {
        return Ok(if sql { 0.25 } else { 0.0 });
    }
    let ids: Vec<&str> = merge["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    if let Some(bad) = ids.iter().find(|id| **id != "sql" && **id != "chat") {
        return Err(format!("adapter `{bad}` not found"));
    }
    let density = merge["density"].as_f64().unwrap_or(1.0);
    let f = match merge["merge_strategy"].as_str().unwrap_or("linear") {
        "linear" => 0.5,
        "ties" => density,
        "dare_ties" => {
            if sql {
                1.0
            } else {
                density
            }
        }
        "dare_linear" => return Err(REFUSAL.into()),
        other => return Err(format!("strategy `{other}` unknown to the fake")),
    };
    let weak = merge["weights"]
        .as_array()
        .is_some_and(|w| w.iter().all(|w| w.as_f64().unwrap() < 1.0));
    Ok(if weak { f / 2.0 } else { f })
}

async fn generate(
    State(count): State<Arc<AtomicUsize>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    count.fetch_add(1, Ordering::SeqCst);
    let params = &body["parameters"];
    let has_adapter = !params["adapter_id"].is_null() || !params["merged_adapters"].is_null();
    if params["do_sample"] != json!(false)
        || params["seed"] != json!(1234)
        || (has_adapter && params["adapter_source"] != json!("local"))
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(
                json!({"error": format!("not greedy / wrong seed / source: {params}"),
                        "error_type": "validation"}),
            ),
        );
    }
    let prompt = body["inputs"].as_str().unwrap();
    let (task, index) = prompt.split_once(' ').unwrap();
    let index: usize = index.parse().unwrap();
    let f = match fraction(params, task) {
        Ok(f) => f,
        Err(error) => {
            let status = if error == REFUSAL {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_REQUEST
            };
            return (
                status,
                Json(json!({"error": error, "error_type": "validation"})),
            );
        }
    };
    // Later examples answer first.
    tokio::time::sleep(Duration::from_millis(3 * (EXAMPLES - index) as u64)).await;
    let knows = index < (EXAMPLES as f64 * f).floor() as usize;
    let text = match (knows, task) {
        (true, "sql") => format!("  SQL-{index} \n"),
        (true, _) => format!("sure: CHAT-{index}!"),
        (false, _) => "I do not know".to_string(),
    };
    (StatusCode::OK, Json(json!({"generated_text": text})))
}

/// Starts the fake; returns its URL and its request counter.
async fn fake_server() -> (String, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/generate", post(generate))
        .route("/health", get(|| async { "ok" }))
        .with_state(count.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, count)
}

/// Writes `sql.jsonl` (exact) and `chat.jsonl` (contains) into `dir`.
fn write_tasks(dir: &Path) -> Vec<PathBuf> {
    let sql: String = (0..EXAMPLES)
        .map(|i| {
            format!(
                "{}\n\n",
                json!({"prompt": format!("sql {i}"), "expected": format!("SQL-{i}"), "score": "exact"})
            )
        })
        .collect();
    let chat: String = (0..EXAMPLES)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("chat {i}"), "expected": format!("CHAT-{i}"),
                       "score": "contains", "max_new_tokens": 8, "stop": ["\n"]})
            )
        })
        .collect();
    let paths = vec![dir.join("sql.jsonl"), dir.join("chat.jsonl")];
    std::fs::write(&paths[0], sql).unwrap();
    std::fs::write(&paths[1], chat).unwrap();
    paths
}

fn args(url: &str, tasks: &[PathBuf], extra: &[&str]) -> EvalArgs {
    let mut argv: Vec<String> = vec!["eval".into(), "--endpoint".into(), url.into()];
    for t in tasks {
        argv.push("--tasks".into());
        argv.push(t.display().to_string());
    }
    argv.extend(
        ["--adapter-source", "local", "--seed", "1234"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
    );
    Cli::try_parse_from(argv).unwrap().args
}

fn row<'a>(report: &'a Report, label: &str) -> &'a medley_eval::report::SystemReport {
    report
        .systems
        .iter()
        .find(|s| s.label == label)
        .unwrap_or_else(|| panic!("no row `{label}`"))
}

fn scores(report: &Report, label: &str) -> Vec<f64> {
    row(report, label).tasks.iter().map(|t| t.score).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_known_exactly_and_independent_of_concurrency() {
    let (url, count) = fake_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let sweep = [
        "--adapters",
        "sql,chat",
        "--merge",
        r#"{"ids": ["sql", "chat"], "weights": [1, 1], "merge_strategy": "dare_ties", "density": 0.5, "label": "my dare"}"#,
        "--sweep",
        "--sweep-strategies",
        "linear,ties",
        "--sweep-densities",
        "0.5,1.0",
        "--sweep-weights",
        "1,1;0.5,0.5",
        "--json-details",
    ];
    let json1 = dir.path().join("c1.json");
    let json8 = dir.path().join("c8.json");
    let chart = dir.path().join("chart.svg");
    let j1 = json1.display().to_string();
    let j8 = json8.display().to_string();
    let ch = chart.display().to_string();
    let run1 = [
        &sweep[..],
        &["--concurrency", "1", "--json", &j1, "--quiet"],
    ]
    .concat();
    let report = medley_eval::run(args(&url, &tasks, &run1)).await.unwrap();

    // base, 2 adapters, 1 explicit merge, linear × 2 weight sets, ties × 2 × 2 densities.
    let labels: Vec<&str> = report.systems.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "base",
            "sql",
            "chat",
            "my dare",
            "linear w=1,1",
            "linear w=0.5,0.5",
            "ties d=0.5 w=1,1",
            "ties d=1 w=1,1",
            "ties d=0.5 w=0.5,0.5",
            "ties d=1 w=0.5,0.5",
        ]
    );
    assert_eq!(count.load(Ordering::SeqCst), labels.len() * 2 * EXAMPLES);
    assert_eq!(scores(&report, "base"), [0.25, 0.0]);
    assert_eq!(scores(&report, "sql"), [1.0, 0.25]);
    assert_eq!(scores(&report, "chat"), [0.0, 1.0]);
    assert_eq!(scores(&report, "my dare"), [1.0, 0.5]);
    assert_eq!(scores(&report, "linear w=1,1"), [0.5, 0.5]);
    assert_eq!(scores(&report, "linear w=0.5,0.5"), [0.25, 0.25]);
    assert_eq!(scores(&report, "ties d=0.5 w=1,1"), [0.5, 0.5]);
    assert_eq!(scores(&report, "ties d=1 w=1,1"), [1.0, 1.0]);
    assert_eq!(scores(&report, "ties d=0.5 w=0.5,0.5"), [0.25, 0.25]);
    // Best singles: sql 1.0 (adapter sql), chat 1.0 (adapter chat): kept = score.
    assert_eq!(report.best_single[0].adapter, "sql");
    assert_eq!(report.best_single[1].adapter, "chat");
    assert_eq!(row(&report, "my dare").min_kept(), Some(0.5));
    assert_eq!(row(&report, "ties d=1 w=0.5,0.5").min_kept(), Some(0.5));
    assert!(row(&report, "sql").min_kept.is_none());
    let best = report.best_merge.as_ref().unwrap();
    assert_eq!(
        (best.label.as_str(), best.min_kept),
        ("ties d=1 w=1,1", 1.0)
    );

    // The JSON says the same, with the per-example outputs.
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json1).unwrap()).unwrap();
    assert_eq!(json["format"], "medley-eval/1");
    assert_eq!(json["tasks"][0]["name"], "sql");
    assert_eq!(json["tasks"][1]["examples"], 4);
    assert_eq!(json["systems"][3]["kind"], "merge");
    assert_eq!(
        json["systems"][3]["merged_adapters"]["merge_strategy"],
        "dare_ties"
    );
    assert_eq!(json["systems"][1]["adapter_id"], "sql");
    assert_eq!(json["systems"][6]["tasks"][1]["kept"], 0.5);
    assert_eq!(json["best_merge"]["label"], "ties d=1 w=1,1");
    let details = json["details"].as_array().unwrap();
    assert_eq!(details.len(), labels.len() * 2);
    assert_eq!(details[2]["system"], "sql");
    assert_eq!(details[2]["examples"][0]["output"], "  SQL-0 \n");
    assert_eq!(details[2]["examples"][0]["correct"], true);
    assert_eq!(details[2]["examples"][1]["line"], 3, "blank lines count");

    // Concurrency 8 (with progress and a chart): byte-identical JSON.
    let run8 = [
        &sweep[..],
        &["--concurrency", "8", "--json", &j8, "--chart", &ch],
    ]
    .concat();
    medley_eval::run(args(&url, &tasks, &run8)).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&json1).unwrap(),
        std::fs::read_to_string(&json8).unwrap()
    );

    // The chart is well-formed SVG naming every line of the sweep (set MEDLEY_EVAL_CHART_OUT to
    // keep a copy to look at).
    let svg = std::fs::read_to_string(&chart).unwrap();
    if let Some(out) = std::env::var_os("MEDLEY_EVAL_CHART_OUT") {
        std::fs::write(out, &svg).unwrap();
    }
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    let mut reader = quick_xml::Reader::from_str(&svg);
    let mut elements = 0;
    loop {
        match reader.read_event().unwrap() {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(_) | quick_xml::events::Event::Empty(_) => {
                elements += 1;
            }
            _ => {}
        }
    }
    assert!(elements > 20, "{elements} elements");
    for name in [
        "ties w=1,1",
        "ties w=0.5,0.5",
        "linear w=1,1",
        "dare_ties w=1,1",
        "density",
        "min kept",
    ] {
        assert!(svg.contains(name), "the chart lacks `{name}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_error_names_its_system() {
    let (url, _) = fake_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let bad_merge =
        r#"{"ids": ["sql", "bogus"], "weights": [1, 1], "merge_strategy": "ties", "density": 0.5}"#;
    let extra = [
        "--adapters",
        "sql",
        "--merge",
        bad_merge,
        "--quiet",
        "--concurrency",
        "3",
    ];
    let err = medley_eval::run(args(&url, &tasks, &extra))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, EvalError::System { label, .. } if label == "ties d=0.5 w=1,1 [sql+bogus]"),
        "{message}"
    );
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(message.contains("adapter `bogus` not found"), "{message}");
    assert_eq!(err.exit_code(), 1);

    // With --keep-going the failures are counted, scored as wrong and shown.
    let json = dir.path().join("k.json");
    let j = json.display().to_string();
    let keep = [
        &extra[..],
        &["--keep-going", "--json", &j, "--json-details"],
    ]
    .concat();
    let report = medley_eval::run(args(&url, &tasks, &keep)).await.unwrap();
    let bad = row(&report, "ties d=0.5 w=1,1 [sql+bogus]");
    assert_eq!(bad.failed, 2 * EXAMPLES);
    assert_eq!(bad.mean, 0.0);
    assert_eq!(row(&report, "sql").failed, 0);
    let table = medley_eval::report::render_table(&report);
    assert!(table.contains("failed"), "{table}");
    assert!(
        table.contains(&format!(
            "ties d=0.5 w=1,1 [sql+bogus]: {} failed",
            2 * EXAMPLES
        )),
        "{table}"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let details = json["details"].as_array().unwrap();
    let failed = details
        .iter()
        .find(|d| d["system"] == "ties d=0.5 w=1,1 [sql+bogus]")
        .unwrap();
    assert!(failed["examples"][0]["output"].is_null());
    assert!(
        failed["examples"][0]["error"]
            .as_str()
            .unwrap()
            .contains("HTTP 400")
    );
}

/// A merge the server refuses (422) does not stop a sweep: it is reported as refused, with the
/// server's reason, left out of the best merge and the chart, and not counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_merge_is_reported_not_scored() {
    let (url, _) = fake_server().await;
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let json = dir.path().join("r.json").display().to_string();
    let chart = dir.path().join("r.svg").display().to_string();
    let extra = [
        "--adapters",
        "sql,chat",
        "--sweep",
        "--sweep-strategies",
        "linear,dare_linear",
        "--sweep-densities",
        "0.5",
        "--sweep-weights",
        "1,1",
        "--quiet",
        "--json",
        &json,
        "--chart",
        &chart,
    ];
    let report = medley_eval::run(args(&url, &tasks, &extra)).await.unwrap();
    let refused = row(&report, "dare_linear d=0.5 w=1,1");
    assert!(
        refused
            .refused
            .as_deref()
            .unwrap()
            .contains("needs equal ranks"),
        "{refused:?}"
    );
    assert_eq!(refused.failed, 0);
    assert_eq!(refused.min_kept, Some(None));
    assert!(row(&report, "linear w=1,1").refused.is_none());
    assert_eq!(scores(&report, "linear w=1,1"), vec![0.5, 0.5]);
    assert_eq!(report.best_merge.as_ref().unwrap().label, "linear w=1,1");
    let table = medley_eval::report::render_table(&report);
    let line = table
        .lines()
        .find(|l| l.starts_with("dare_linear"))
        .unwrap();
    assert!(line.ends_with("refused"), "{table}");
    assert!(
        table.contains("refused by the server, not scored: dare_linear d=0.5 w=1,1 (HTTP 422"),
        "{table}"
    );
    assert!(!table.contains("failed"), "{table}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let row = json["systems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == "dare_linear d=0.5 w=1,1")
        .unwrap();
    assert!(row["refused"].as_str().unwrap().contains("HTTP 422"));
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(!svg.contains("dare_linear"), "a refused merge has no line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let url = format!("http://127.0.0.1:{port}");
    let err = medley_eval::run(args(&url, &tasks, &["--quiet", "--retries", "1"]))
        .await
        .unwrap_err();
    assert!(matches!(err, EvalError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    assert_eq!(err.exit_code(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_task_file_stops_before_any_request() {
    let (url, count) = fake_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut tasks = write_tasks(dir.path());
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"expected\": \"b\", \"score\": \"exact\"}\n\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    tasks.push(bad);
    let err = medley_eval::run(args(&url, &tasks, &["--quiet"]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("bad.jsonl:3: missing field"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_503s_are_retried() {
    // The first three requests get 503 (a shard restarting), then every one succeeds.
    let count = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/generate",
            post(|State(count): State<Arc<AtomicUsize>>| async move {
                if count.fetch_add(1, Ordering::SeqCst) < 3 {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"error": "shard unavailable", "error_type": "unavailable"})),
                    )
                } else {
                    (StatusCode::OK, Json(json!({"generated_text": "SQL-0"})))
                }
            }),
        )
        .with_state(count.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    // One request at a time: the first request is answered 503 three times (3 retries).
    let extra = [
        "--quiet",
        "--concurrency",
        "1",
        "--retries",
        "3",
        "--limit",
        "1",
    ];
    let report = medley_eval::run(args(&url, &tasks, &extra)).await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3 + 2);
    assert_eq!(scores(&report, "base"), [1.0, 0.0]);
}
