//! Runs every (system, task, example) request with bounded concurrency and puts the outcomes
//! back in order, so results never depend on `--concurrency` or on completion order.

use std::io::IsTerminal as _;

use futures::StreamExt as _;

use crate::client::{Client, ClientError, Parameters};
use crate::error::EvalError;
use crate::systems::System;
use crate::tasks::Task;

/// How requests are made.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Requests in flight at once (at least 1).
    pub concurrency: usize,
    /// The request `seed`.
    pub seed: u64,
    /// `max_new_tokens` of examples that set none.
    pub max_new_tokens: u32,
    /// `adapter_source` of adapter and merge requests.
    pub adapter_source: Option<String>,
    /// Score a failed request as wrong (and count it) instead of stopping.
    pub keep_going: bool,
    /// Show progress on stderr.
    pub progress: bool,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The generated text (`None` when the request failed).
    pub output: Option<String>,
    /// Whether it scored as correct (a failure never does).
    pub correct: bool,
    /// The failure, with `--keep-going` or when refused.
    pub error: Option<String>,
    /// The server refused the merge as invalid (HTTP 422: e.g. `linear` over adapters of
    /// different ranks). The run goes on; the system is reported as refused, not scored.
    pub refused: bool,
}

impl Outcome {
    /// A request that got no text: `source` failed it, or refused its merge (`refused`).
    fn failure(source: &ClientError, refused: bool) -> Self {
        Self {
            output: None,
            correct: false,
            error: Some(source.to_string()),
            refused,
        }
    }
}

/// Whether `err` is the server refusing `system`'s merge spec rather than a failed request.
fn is_refusal(system: &System, err: &ClientError) -> bool {
    system.merge().is_some() && matches!(err, ClientError::Http { status: 422, .. })
}

/// Outcomes indexed `[system][task][example]`, in the order of the inputs.
pub type Outcomes = Vec<Vec<Vec<Outcome>>>;

/// Runs every request; the first failure stops the run unless `keep_going`.
pub async fn run_all(
    client: &Client,
    systems: &[System],
    tasks: &[Task],
    config: &RunConfig,
) -> Result<Outcomes, EvalError> {
    let jobs: Vec<(usize, usize, usize)> = (0..systems.len())
        .flat_map(|s| {
            tasks
                .iter()
                .enumerate()
                .flat_map(move |(t, task)| (0..task.examples.len()).map(move |e| (s, t, e)))
        })
        .collect();
    let mut progress = Progress::new(jobs.len(), config.progress);
    let mut outcomes: Outcomes = systems
        .iter()
        .map(|_| {
            tasks
                .iter()
                .map(|t| Vec::with_capacity(t.examples.len()))
                .collect()
        })
        .collect();
    let mut slots: Vec<Option<Outcome>> = vec![None; jobs.len()];
    let requests = jobs.iter().enumerate().map(|(i, &(s, t, e))| {
        let system = &systems[s];
        let example = &tasks[t].examples[e];
        async move {
            let parameters = Parameters::new(
                &system.kind,
                config.adapter_source.as_deref(),
                example.max_new_tokens.unwrap_or(config.max_new_tokens),
                config.seed,
                &example.stop,
            );
            (i, client.generate(&example.prompt, &parameters).await)
        }
    });
    let mut stream = futures::stream::iter(requests).buffer_unordered(config.concurrency.max(1));
    let mut failed = 0usize;
    while let Some((i, result)) = stream.next().await {
        let (s, t, e) = jobs[i];
        let outcome = match result {
            Ok(text) => Outcome {
                correct: tasks[t].examples[e].rule.matches(&text),
                output: Some(text),
                error: None,
                refused: false,
            },
            Err(source) if is_refusal(&systems[s], &source) => {
                tracing::debug!(system = %systems[s].label, error = %source, "merge refused");
                Outcome::failure(&source, true)
            }
            Err(source) if config.keep_going => {
                failed += 1;
                tracing::debug!(system = %systems[s].label, error = %source, "request failed");
                Outcome::failure(&source, false)
            }
            Err(source) => {
                progress.finish();
                return Err(EvalError::System {
                    label: systems[s].label.clone(),
                    source,
                });
            }
        };
        slots[i] = Some(outcome);
        progress.tick(failed);
    }
    progress.finish();
    for (&(s, t, _), slot) in jobs.iter().zip(slots) {
        // Every slot is filled: the stream yields each job once.
        if let Some(outcome) = slot {
            outcomes[s][t].push(outcome);
        }
    }
    Ok(outcomes)
}

/// Progress on stderr: a bar on a terminal, otherwise a line every tenth of the run.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    total: usize,
    done: usize,
    next_line: usize,
    printed: usize,
}

impl Progress {
    fn new(total: usize, enabled: bool) -> Self {
        let terminal = enabled && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} requests {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self {
            bar,
            lines: enabled && !terminal,
            total,
            done: 0,
            next_line: 0,
            printed: 0,
        }
    }

    fn tick(&mut self, failed: usize) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if failed > 0 {
                bar.set_message(format!("({failed} failed)"));
            }
        } else if self.lines && (self.done >= self.next_line || self.done == self.total) {
            let failed = if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            };
            eprintln!("medley eval: {}/{} requests{failed}", self.done, self.total);
            self.printed = self.done;
            self.next_line = self.done + self.total.div_ceil(10).max(1);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        } else if self.lines && self.printed != self.done {
            eprintln!("medley eval: {}/{} requests", self.done, self.total);
        }
    }
}
