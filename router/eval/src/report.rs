//! Scores, "kept" ratios and the best merge; the JSON report and the text table.
//!
//! * A system's score on a task is the fraction of its examples scored correct (a failed request,
//!   with `--keep-going`, counts as wrong and is counted in `failed`).
//! * A merge's **kept** on a task is its score divided by the best score of the single adapters
//!   (`--adapters`) on that task. It is undefined (`null`) when that best score is 0 or there are no
//!   single adapters, and it can exceed 1 when the merge beats every adapter.
//! * **min kept** is the smallest defined kept over the tasks; the best merge is the one with
//!   the highest min kept (ties: higher mean score, then the earlier row).

use std::fmt::Write as _;

use serde::Serialize;

use crate::runner::Outcomes;
use crate::systems::{System, SystemKind};
use crate::tasks::Task;

/// Version tag of the JSON layout.
pub const FORMAT: &str = "medley-eval/1";

/// The settings a report was made with (nothing time-dependent: reports of the same inputs are
/// byte-identical).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The server's URL.
    pub endpoint: String,
    /// `adapter_source` sent with adapters and merges.
    pub adapter_source: Option<String>,
    /// The request seed.
    pub seed: u64,
    /// Default `max_new_tokens`.
    pub max_new_tokens: u32,
    /// `--limit`.
    pub limit: Option<usize>,
    /// `--keep-going`.
    pub keep_going: bool,
}

/// A task as evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    /// The task's name (file stem).
    pub name: String,
    /// The file, as given.
    pub file: String,
    /// Examples evaluated (after `--limit`).
    pub examples: usize,
}

/// The best single adapter on one task.
#[derive(Debug, Clone, Serialize)]
pub struct BestSingle {
    /// The task.
    pub task: String,
    /// The adapter's label (the first of equals).
    pub adapter: String,
    /// Its score.
    pub score: f64,
}

/// One system's result on one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScore {
    /// The task.
    pub task: String,
    /// Examples scored correct.
    pub correct: usize,
    /// Examples.
    pub total: usize,
    /// Requests that failed (`--keep-going`).
    pub failed: usize,
    /// `correct / total`.
    pub score: f64,
    /// For merges: score relative to the best single adapter (`null` when undefined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<Option<f64>>,
}

/// One row.
#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    /// The label.
    pub label: String,
    /// What it sent.
    #[serde(flatten)]
    pub kind: SystemKind,
    /// Per task, in task order.
    pub tasks: Vec<TaskScore>,
    /// Mean score over the tasks.
    pub mean: f64,
    /// Failed requests in all.
    pub failed: usize,
    /// For merges: the smallest kept over the tasks (`null` when none is defined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_kept: Option<Option<f64>>,
    /// Why the server refused this merge (its first refusal); a refused merge is not scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl SystemReport {
    /// Whether the row is a merge.
    pub fn is_merge(&self) -> bool {
        matches!(self.kind, SystemKind::Merge { .. })
    }

    /// The min kept, when defined.
    pub fn min_kept(&self) -> Option<f64> {
        self.min_kept.flatten()
    }
}

/// The merge with the highest min kept.
#[derive(Debug, Clone, Serialize)]
pub struct BestMerge {
    /// Its label.
    pub label: String,
    /// Its min kept.
    pub min_kept: f64,
    /// Its mean score.
    pub mean: f64,
}

/// One example's outcome (`--json-details`).
#[derive(Debug, Clone, Serialize)]
pub struct ExampleDetail {
    /// The example's line in its task file.
    pub line: usize,
    /// The generated text (`null` when the request failed).
    pub output: Option<String>,
    /// Whether it scored correct.
    pub correct: bool,
    /// The failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One system's outcomes on one task (`--json-details`).
#[derive(Debug, Clone, Serialize)]
pub struct TaskDetails {
    /// The system's label.
    pub system: String,
    /// The task.
    pub task: String,
    /// In file order.
    pub examples: Vec<ExampleDetail>,
}

/// Everything `--json` writes.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`FORMAT`].
    pub format: &'static str,
    /// How the run was made.
    pub settings: Settings,
    /// The tasks.
    pub tasks: Vec<TaskInfo>,
    /// The best single adapter per task (empty without `--adapters`).
    pub best_single: Vec<BestSingle>,
    /// The rows.
    pub systems: Vec<SystemReport>,
    /// The best merge by min kept (`null` without merges or single adapters).
    pub best_merge: Option<BestMerge>,
    /// Per-example outcomes, with `--json-details`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<TaskDetails>>,
}

/// Builds the report from the ordered outcomes.
pub fn build_report(
    settings: Settings,
    systems: &[System],
    tasks: &[Task],
    outcomes: &Outcomes,
    with_details: bool,
) -> Report {
    let mut rows: Vec<SystemReport> = systems
        .iter()
        .zip(outcomes)
        .map(|(system, per_task)| {
            let scores: Vec<TaskScore> = tasks
                .iter()
                .zip(per_task)
                .map(|(task, outs)| {
                    let correct = outs.iter().filter(|o| o.correct).count();
                    let total = outs.len();
                    TaskScore {
                        task: task.name.clone(),
                        correct,
                        total,
                        failed: outs
                            .iter()
                            .filter(|o| o.error.is_some() && !o.refused)
                            .count(),
                        score: ratio(correct, total),
                        kept: None,
                    }
                })
                .collect();
            SystemReport {
                label: system.label.clone(),
                kind: system.kind.clone(),
                mean: mean(scores.iter().map(|s| s.score)),
                failed: scores.iter().map(|s| s.failed).sum(),
                tasks: scores,
                min_kept: None,
                refused: per_task
                    .iter()
                    .flatten()
                    .find(|o| o.refused)
                    .and_then(|o| o.error.clone()),
            }
        })
        .collect();
    let best_single: Vec<BestSingle> = tasks
        .iter()
        .enumerate()
        .filter_map(|(t, task)| {
            rows.iter()
                .filter(|r| matches!(r.kind, SystemKind::Adapter { .. }))
                .fold(None::<(&SystemReport, f64)>, |best, r| {
                    let score = r.tasks[t].score;
                    match best {
                        Some((_, b)) if b >= score => best,
                        _ => Some((r, score)),
                    }
                })
                .map(|(r, score)| BestSingle {
                    task: task.name.clone(),
                    adapter: r.label.clone(),
                    score,
                })
        })
        .collect();
    for row in rows.iter_mut().filter(|r| r.is_merge()) {
        if row.refused.is_some() {
            row.min_kept = Some(None);
            continue;
        }
        for (t, score) in row.tasks.iter_mut().enumerate() {
            let best = best_single.iter().find(|b| b.task == tasks[t].name);
            score.kept = Some(
                best.filter(|b| b.score > 0.0)
                    .map(|b| score.score / b.score),
            );
        }
        row.min_kept = Some(
            row.tasks
                .iter()
                .filter_map(|s| s.kept.flatten())
                .reduce(f64::min),
        );
    }
    let best_merge = rows
        .iter()
        .filter_map(|r| r.min_kept().map(|k| (r, k)))
        .fold(None::<(&SystemReport, f64)>, |best, (r, k)| match best {
            Some((b, bk)) if bk > k || (bk == k && b.mean >= r.mean) => best,
            _ => Some((r, k)),
        })
        .map(|(r, k)| BestMerge {
            label: r.label.clone(),
            min_kept: k,
            mean: r.mean,
        });
    let details = with_details.then(|| {
        systems
            .iter()
            .zip(outcomes)
            .flat_map(|(system, per_task)| {
                tasks.iter().zip(per_task).map(|(task, outs)| TaskDetails {
                    system: system.label.clone(),
                    task: task.name.clone(),
                    examples: task
                        .examples
                        .iter()
                        .zip(outs)
                        .map(|(example, o)| ExampleDetail {
                            line: example.line,
                            output: o.output.clone(),
                            correct: o.correct,
                            error: o.error.clone(),
                        })
                        .collect(),
                })
            })
            .collect()
    });
    Report {
        format: FORMAT,
        tasks: tasks
            .iter()
            .map(|t| TaskInfo {
                name: t.name.clone(),
                file: t.path.display().to_string(),
                examples: t.examples.len(),
            })
            .collect(),
        settings,
        best_single,
        systems: rows,
        best_merge,
        details,
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The report as pretty JSON, newline-terminated.
pub fn to_json(report: &Report) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(report).map(|s| s + "\n")
}

/// The aligned text table plus the summary lines.
pub fn render_table(report: &Report) -> String {
    let label_width = report
        .systems
        .iter()
        .map(|s| s.label.chars().count())
        .chain(["system".len()])
        .max()
        .unwrap_or(6);
    let any_failed = report.systems.iter().any(|s| s.failed > 0);
    let any_merge = report.systems.iter().any(SystemReport::is_merge);
    let mut columns: Vec<String> = report.tasks.iter().map(|t| t.name.clone()).collect();
    columns.push("mean".into());
    if any_merge {
        columns.push("min kept".into());
    }
    if any_failed {
        columns.push("failed".into());
    }
    let widths: Vec<usize> = columns.iter().map(|c| c.chars().count().max(5)).collect();
    let mut out = String::new();
    let _ = write!(out, "{:<label_width$}", "system");
    for (c, w) in columns.iter().zip(&widths) {
        let _ = write!(out, "  {c:>w$}");
    }
    out.push('\n');
    for row in &report.systems {
        let refused = row.refused.is_some();
        let score = |v: f64| {
            if refused {
                "-".to_string()
            } else {
                format!("{v:.3}")
            }
        };
        let mut cells: Vec<String> = row.tasks.iter().map(|t| score(t.score)).collect();
        cells.push(score(row.mean));
        if any_merge {
            cells.push(match row.min_kept {
                _ if refused => "refused".into(),
                Some(Some(k)) => format!("{k:.3}"),
                Some(None) => "n/a".into(),
                None => "-".into(),
            });
        }
        if any_failed {
            cells.push(row.failed.to_string());
        }
        let _ = write!(out, "{:<label_width$}", row.label);
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        out.push('\n');
    }
    out.push('\n');
    match &report.best_merge {
        Some(b) => {
            let _ = writeln!(
                out,
                "best merge by min kept over tasks: {} (min kept {:.3}, mean {:.3})",
                b.label, b.min_kept, b.mean
            );
        }
        None if !any_merge => {}
        None if report.best_single.is_empty() => {
            out.push_str("no best merge: kept needs single adapters (--adapters)\n");
        }
        None => out.push_str("no best merge: every best single adapter scored 0\n"),
    }
    let mut refusals: Vec<(&str, Vec<&str>)> = Vec::new();
    for row in &report.systems {
        if let Some(why) = &row.refused {
            match refusals.iter_mut().find(|(w, _)| *w == why.as_str()) {
                Some((_, labels)) => labels.push(&row.label),
                None => refusals.push((why, vec![&row.label])),
            }
        }
    }
    for (why, labels) in &refusals {
        let _ = writeln!(
            out,
            "refused by the server, not scored: {} ({why})",
            labels.join(", ")
        );
    }
    if any_failed {
        let total: usize = report.systems.iter().map(|s| s.failed).sum();
        let _ = writeln!(out, "{total} request(s) failed and were scored as wrong:");
        for row in report.systems.iter().filter(|s| s.failed > 0) {
            let _ = writeln!(out, "  {}: {} failed", row.label, row.failed);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::runner::Outcome;
    use crate::systems::{MergeSpec, System};
    use crate::tasks::parse_task;

    fn merge(label: &str) -> System {
        System {
            label: label.into(),
            kind: SystemKind::Merge {
                merged_adapters: MergeSpec {
                    ids: vec!["a".into(), "b".into()],
                    weights: None,
                    merge_strategy: None,
                    density: None,
                    majority_sign_method: None,
                    seed: None,
                    svd_rank: None,
                    svd_clamp: None,
                },
            },
        }
    }

    fn adapter(id: &str) -> System {
        System {
            label: id.into(),
            kind: SystemKind::Adapter {
                adapter_id: id.into(),
            },
        }
    }

    fn outs(correct: &[bool]) -> Vec<Outcome> {
        correct
            .iter()
            .map(|&c| Outcome {
                output: Some(String::new()),
                correct: c,
                error: None,
                refused: false,
            })
            .collect()
    }

    fn settings() -> Settings {
        Settings {
            endpoint: "http://x".into(),
            adapter_source: None,
            seed: 0,
            max_new_tokens: 8,
            limit: None,
            keep_going: false,
        }
    }

    #[test]
    fn kept_is_relative_to_the_best_single_adapter_per_task() {
        let line = "{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"exact\"}\n".repeat(4);
        let tasks = vec![
            parse_task(std::path::Path::new("x.jsonl"), &line).unwrap(),
            parse_task(std::path::Path::new("y.jsonl"), &line).unwrap(),
        ];
        let systems = vec![
            adapter("a"),
            adapter("b"),
            merge("m1"),
            merge("m2"),
            merge("m3"),
        ];
        let t = true;
        let f = false;
        let outcomes = vec![
            vec![outs(&[t, t, t, t]), outs(&[t, f, f, f])], // a: 1.0, 0.25
            vec![outs(&[t, f, f, f]), outs(&[t, t, f, f])], // b: 0.25, 0.5
            vec![outs(&[t, t, t, f]), outs(&[t, f, f, f])], // m1: kept 0.75, 0.5
            vec![outs(&[t, t, f, f]), outs(&[t, t, f, f])], // m2: kept 0.5, 1.0
            vec![outs(&[t, t, t, f]), outs(&[f, f, f, f])], // m3: kept 0.75, 0
        ];
        let report = build_report(settings(), &systems, &tasks, &outcomes, false);
        assert_eq!(report.best_single[0].adapter, "a");
        assert_eq!(report.best_single[1].adapter, "b");
        assert_eq!(report.systems[2].tasks[0].kept, Some(Some(0.75)));
        assert_eq!(report.systems[2].min_kept(), Some(0.5));
        assert_eq!(report.systems[3].min_kept(), Some(0.5));
        assert_eq!(report.systems[4].min_kept(), Some(0.0));
        assert!(report.systems[0].min_kept.is_none());
        // m1 and m2 tie on min kept and on mean (0.5 each): the earlier row wins.
        assert_eq!(report.best_merge.as_ref().unwrap().label, "m1");
        let table = render_table(&report);
        assert!(
            table.contains("best merge by min kept over tasks: m1"),
            "{table}"
        );
        let header = table.lines().next().unwrap();
        assert!(header.starts_with("system"), "{header}");
        assert!(header.ends_with("min kept"), "{header}");
        // Every row has the header's width.
        let lines: Vec<&str> = table.lines().take(6).collect();
        assert!(lines.iter().all(|l| l.len() == header.len()), "{table}");
    }

    #[test]
    fn kept_is_undefined_without_a_nonzero_single() {
        let line = "{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"exact\"}\n";
        let tasks = vec![parse_task(std::path::Path::new("x.jsonl"), line).unwrap()];
        let report = build_report(
            settings(),
            &[adapter("a"), merge("m")],
            &tasks,
            &vec![vec![outs(&[false])], vec![outs(&[true])]],
            true,
        );
        assert_eq!(report.systems[1].tasks[0].kept, Some(None));
        assert_eq!(report.systems[1].min_kept, Some(None));
        assert!(report.best_merge.is_none());
        let json: serde_json::Value = serde_json::from_str(&to_json(&report).unwrap()).unwrap();
        assert!(json["systems"][1]["min_kept"].is_null());
        assert!(json["systems"][0].get("min_kept").is_none());
        assert_eq!(json["details"][1]["examples"][0]["correct"], true);
        assert!(render_table(&report).contains("every best single adapter scored 0"));
    }
}
