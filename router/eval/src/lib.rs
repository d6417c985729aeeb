//! `medley eval`: measures how much of each adapter's skill a merge keeps.
//!
//! It scores JSONL task sets against a running Medley server (any LoRAX-compatible `/generate`
//! works) for the base model, each adapter alone, explicit merges and a strategy × density ×
//! weights sweep of merges, then prints a table of per-task scores with each merge's score
//! relative to the best single adapter ("kept"), and optionally writes a JSON report and an SVG
//! chart. It is a pure HTTP client: no model code.
//!
//! Modules: [`args`] (flags), [`tasks`] (task files and scoring), [`systems`] (rows and the
//! sweep grid), [`client`] (HTTP with retries), [`runner`] (concurrency, ordering),
//! [`report`] (scores, table, JSON), [`chart`] (SVG).

pub mod args;
pub mod chart;
pub mod client;
pub mod error;
pub mod report;
pub mod runner;
pub mod systems;
pub mod tasks;

use std::path::Path;
use std::time::Instant;

pub use args::{EvalArgs, EvalConfig};
pub use error::EvalError;
pub use report::Report;

/// Runs `medley eval` with its flags: prints the table to stdout and writes `--json` and
/// `--chart`; returns the report.
pub async fn run(args: EvalArgs) -> Result<Report, EvalError> {
    run_config(args.into_config()?).await
}

/// [`run`] with checked settings.
pub async fn run_config(config: EvalConfig) -> Result<Report, EvalError> {
    let started = Instant::now();
    let tasks = tasks::load_tasks(&config.task_files, config.limit)?;
    let systems = systems::build_systems(&config.systems)?;
    if systems.is_empty() {
        return Err(EvalError::Args(
            "nothing to evaluate (--no-base without --adapters, --merge or --sweep)".into(),
        ));
    }
    if config.chart.is_some() && !systems.iter().any(|s| s.merge().is_some()) {
        return Err(EvalError::Args(
            "--chart plots merges: give --merge or --sweep".into(),
        ));
    }
    let client = client::Client::new(config.client.clone())?;
    client.check_reachable().await?;
    let requests: usize = systems.len() * tasks.iter().map(|t| t.examples.len()).sum::<usize>();
    if config.run.progress {
        eprintln!(
            "medley eval: {} systems × {} tasks = {requests} requests to {}",
            systems.len(),
            tasks.len(),
            config.client.endpoint
        );
    }
    let outcomes = runner::run_all(&client, &systems, &tasks, &config.run).await?;
    let settings = report::Settings {
        endpoint: config.client.endpoint.clone(),
        adapter_source: config.run.adapter_source.clone(),
        seed: config.run.seed,
        max_new_tokens: config.run.max_new_tokens,
        limit: config.limit,
        keep_going: config.run.keep_going,
    };
    let report = report::build_report(settings, &systems, &tasks, &outcomes, config.json_details);
    print!("{}", report::render_table(&report));
    if let Some(path) = &config.json {
        let json = report::to_json(&report).map_err(|e| output_error(path, e.to_string()))?;
        write(path, &json)?;
    }
    if let Some(path) = &config.chart {
        let svg = chart::render_svg(&report, &config.systems.adapters)
            .map_err(|e| output_error(path, e))?;
        write(path, &svg)?;
    }
    if config.run.progress {
        eprintln!(
            "medley eval: {requests} requests in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(report)
}

fn output_error(path: &Path, message: String) -> EvalError {
    EvalError::Output {
        path: path.to_path_buf(),
        message,
    }
}

fn write(path: &Path, text: &str) -> Result<(), EvalError> {
    std::fs::write(path, text).map_err(|e| output_error(path, e.to_string()))
}

/// Logs to stderr for the `medley eval` process: `RUST_LOG`, default `warn` (retries show up as
/// warnings). Does nothing if a subscriber is already set.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
