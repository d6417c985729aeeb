//! The flags of `medley eval`, and their checked form ([`EvalConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::client::ClientConfig;
use crate::error::EvalError;
use crate::runner::RunConfig;
use crate::systems::{STRATEGIES, SweepGrid, SystemsConfig, parse_merge_arg};

/// Scores task sets against a running Medley (or LoRAX) server: the base model, each adapter
/// alone, merges, and a strategy × density × weights sweep of merges; reports how much of the
/// best single adapter's score each merge keeps on every task.
///
/// Example: two adapters, one explicit merge and the default sweep over both adapters, with a
/// JSON report and a chart:
///
/// ```text
/// medley eval --endpoint http://127.0.0.1:8080 \
///     --tasks sql.jsonl --tasks chat.jsonl \
///     --adapters sql,chat --adapter-source local \
///     --merge '{"ids": ["sql", "chat"], "weights": [1.0, 0.5], "merge_strategy": "ties", "density": 0.3}' \
///     --sweep --sweep-densities 0.1,0.5,1.0 --sweep-weights "1,1;0.7,0.7" \
///     --json eval.json --chart eval.svg --concurrency 8
/// ```
///
/// Task files are JSONL, one `{"prompt", "expected", "score": "exact"|"contains"|"regex"}` per
/// line (optional `max_new_tokens`, `stop`); see [`crate::tasks`] for the scoring rules. Decoding
/// is greedy with a fixed seed, so the same inputs give the same report.
///
/// Exit codes: 0 done (also with failures under `--keep-going`), 1 a system's request failed,
/// 2 invalid arguments or task files, 3 endpoint unreachable, 4 an output cannot be written.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Base URL of the server.
    #[arg(long, env = "MEDLEY_ENDPOINT", default_value = "http://127.0.0.1:8080")]
    pub endpoint: String,
    /// Task files (JSONL); the task is named after the file stem. Repeat or list several.
    /// Without it: the demo's held-out sets (`sql`, `ad`, `instruct`, compiled in).
    #[arg(long, num_args = 1..)]
    pub tasks: Vec<PathBuf>,
    /// Adapters, comma-separated: each is evaluated alone, and they are the ids of sweep merges.
    /// Without it and without --tasks: the demo's adapters (`medley-demo/sql`, `medley-demo/ad`,
    /// `medley-demo/instruct`, which `medley serve` with no model serves offline).
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    /// `adapter_source` of adapter and merge requests (hub, local, s3; default: the server's).
    #[arg(long)]
    pub adapter_source: Option<String>,
    /// A merge to evaluate: LoRAX `merged_adapters` JSON inline or `@file` (an object or a list;
    /// an object may add `"label"` to name its row). Repeatable.
    #[arg(long = "merge", value_name = "JSON|@FILE")]
    pub merges: Vec<String>,
    /// Also evaluate the grid --sweep-strategies × --sweep-weights × --sweep-densities of merges
    /// of --adapters (strategies without a density, like linear, once per weight set).
    #[arg(long)]
    pub sweep: bool,
    /// Strategies of the sweep, comma-separated.
    #[arg(long, default_value = "linear,ties,dare_linear,dare_ties")]
    pub sweep_strategies: String,
    /// Densities of the sweep, comma-separated, each in [0, 1].
    #[arg(long, default_value = "0.1,0.3,0.5,0.7,1.0")]
    pub sweep_densities: String,
    /// Weight sets of the sweep: `;`-separated lists of one comma-separated weight per adapter
    /// (default: 1 each).
    #[arg(long, allow_hyphen_values = true)]
    pub sweep_weights: Option<String>,
    /// `majority_sign_method` of the sweep's merges (total | frequency; default: the server's).
    #[arg(long)]
    pub sweep_sign_method: Option<String>,
    /// DARE seed of the sweep's merges (default: the server derives one from each merge).
    #[arg(long)]
    pub merge_seed: Option<u64>,
    /// Leave the base model out.
    #[arg(long)]
    pub no_base: bool,
    /// Write the full report as JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// Add every example's output to the JSON report.
    #[arg(long, requires = "json")]
    pub json_details: bool,
    /// Write an SVG chart of the merges' scores against density here.
    #[arg(long, value_name = "OUT.svg")]
    pub chart: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Evaluate only the first N examples of each task.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// The request `seed` (decoding is greedy; the seed is sent for reproducibility).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `max_new_tokens` of examples that do not set their own.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
    /// Score failed requests as wrong (and count them) instead of stopping at the first.
    #[arg(long)]
    pub keep_going: bool,
    /// API key of the server (`Authorization: Bearer`).
    #[arg(long, env = "MEDLEY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Retries of a transient failure (connection error, timeout, 429, 503), with exponential
    /// backoff from 250 ms.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The adapters evaluated with the demo's held-out sets when neither --tasks nor --adapters is
/// given: the ones the embedded demo model comes with.
pub const DEMO_ADAPTERS: [&str; 3] = ["medley-demo/sql", "medley-demo/ad", "medley-demo/instruct"];

/// The checked configuration of a run.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Task files.
    pub task_files: Vec<PathBuf>,
    /// `--limit`.
    pub limit: Option<usize>,
    /// What to evaluate.
    pub systems: SystemsConfig,
    /// How to reach the server.
    pub client: ClientConfig,
    /// How to run the requests.
    pub run: RunConfig,
    /// `--json`.
    pub json: Option<PathBuf>,
    /// `--json-details`.
    pub json_details: bool,
    /// `--chart`.
    pub chart: Option<PathBuf>,
}

impl EvalArgs {
    /// Checks the flags and builds the configuration.
    pub fn into_config(mut self) -> Result<EvalConfig, EvalError> {
        if self.tasks.is_empty() && self.adapters.is_empty() {
            self.adapters = DEMO_ADAPTERS.iter().map(|a| a.to_string()).collect();
        }
        let mut merges = Vec::new();
        for value in &self.merges {
            merges.extend(parse_merge_arg(value)?);
        }
        let sweep = if self.sweep {
            Some(self.sweep_grid()?)
        } else {
            None
        };
        if self.adapters.iter().any(|a| a.trim().is_empty()) {
            return Err(EvalError::Args("--adapters has an empty id".into()));
        }
        Ok(EvalConfig {
            task_files: self.tasks,
            limit: self.limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
            systems: SystemsConfig {
                base: !self.no_base,
                adapters: self.adapters,
                merges,
                sweep,
            },
            client: ClientConfig {
                endpoint: self.endpoint,
                api_key: self.api_key.filter(|k| !k.is_empty()),
                timeout: Duration::from_secs(self.timeout_secs.max(1)),
                retries: self.retries,
                backoff: Duration::from_millis(250),
            },
            run: RunConfig {
                concurrency: self.concurrency as usize,
                seed: self.seed,
                max_new_tokens: self.max_new_tokens,
                adapter_source: self.adapter_source,
                keep_going: self.keep_going,
                progress: !self.quiet,
            },
            json: self.json,
            json_details: self.json_details,
            chart: self.chart,
        })
    }

    fn sweep_grid(&self) -> Result<SweepGrid, EvalError> {
        let n = self.adapters.len();
        if n == 0 {
            return Err(EvalError::Args("--sweep needs --adapters".into()));
        }
        let strategies: Vec<String> = split(&self.sweep_strategies, ',')
            .map(str::to_ascii_lowercase)
            .collect();
        if strategies.is_empty() {
            return Err(EvalError::Args("--sweep-strategies is empty".into()));
        }
        if let Some(bad) = strategies
            .iter()
            .find(|s| !STRATEGIES.contains(&s.as_str()))
        {
            return Err(EvalError::Args(format!(
                "--sweep-strategies: unknown strategy `{bad}` (known: {})",
                STRATEGIES.join(", ")
            )));
        }
        let densities = numbers(&self.sweep_densities, "--sweep-densities")?;
        if densities.is_empty() {
            return Err(EvalError::Args("--sweep-densities is empty".into()));
        }
        if let Some(d) = densities.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            return Err(EvalError::Args(format!(
                "--sweep-densities: {d} is not in [0, 1]"
            )));
        }
        let weights = match &self.sweep_weights {
            None => vec![vec![1.0; n]],
            Some(sets) => split(sets, ';')
                .map(|set| {
                    let w = numbers(set, "--sweep-weights")?;
                    if w.len() == n {
                        Ok(w)
                    } else {
                        Err(EvalError::Args(format!(
                            "--sweep-weights: `{set}` has {} weights for {n} adapters",
                            w.len()
                        )))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if weights.is_empty() {
            return Err(EvalError::Args("--sweep-weights is empty".into()));
        }
        Ok(SweepGrid {
            strategies,
            densities,
            weights,
            majority_sign_method: self.sweep_sign_method.clone(),
            seed: self.merge_seed,
        })
    }
}

/// The non-empty trimmed items of `text` split at `sep`.
fn split(text: &str, sep: char) -> impl Iterator<Item = &str> {
    text.split(sep).map(str::trim).filter(|s| !s.is_empty())
}

/// Comma-separated finite numbers.
fn numbers(text: &str, flag: &str) -> Result<Vec<f64>, EvalError> {
    split(text, ',')
        .map(|item| match item.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(EvalError::Args(format!("{flag}: `{item}` is not a number"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvalArgs,
    }

    fn parse(args: &[&str]) -> Result<EvalConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("eval").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_sweep() {
        let c = parse(&[
            "--tasks",
            "a.jsonl",
            "b.jsonl",
            "--adapters",
            "x,y",
            "--sweep",
        ])
        .unwrap();
        assert_eq!(c.task_files.len(), 2);
        assert_eq!(c.run.concurrency, 4);
        assert!(c.systems.base);
        let grid = c.systems.sweep.unwrap();
        assert_eq!(grid.strategies.len(), 4);
        assert_eq!(grid.densities, vec![0.1, 0.3, 0.5, 0.7, 1.0]);
        assert_eq!(grid.weights, vec![vec![1.0, 1.0]]);
    }

    #[test]
    fn sweep_flags_are_checked() {
        let base = ["--tasks", "a.jsonl", "--adapters", "x,y", "--sweep"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        let c = with(&["--sweep-weights", "1,1; 0.7,-0.2"]).unwrap();
        assert_eq!(
            c.systems.sweep.unwrap().weights,
            vec![vec![1.0, 1.0], vec![0.7, -0.2]]
        );
        assert!(
            with(&["--sweep-weights", "1,1,1"])
                .unwrap_err()
                .contains("3 weights for 2")
        );
        assert!(
            with(&["--sweep-densities", "0.5,1.5"])
                .unwrap_err()
                .contains("1.5")
        );
        assert!(
            with(&["--sweep-densities", "x"])
                .unwrap_err()
                .contains("`x`")
        );
        assert!(
            with(&["--sweep-strategies", "ties,best"])
                .unwrap_err()
                .contains("`best`")
        );
        assert!(
            parse(&["--tasks", "a.jsonl", "--sweep"])
                .unwrap_err()
                .contains("needs --adapters")
        );
    }

    #[test]
    fn other_flags_are_checked() {
        let c = parse(&["--adapters", "x"]).unwrap();
        assert_eq!(c.systems.adapters, ["x"], "without --tasks: the demo sets");
        let demo = parse(&["--sweep"]).unwrap();
        assert_eq!(
            demo.systems.adapters, DEMO_ADAPTERS,
            "no flags: the demo adapters"
        );
        assert!(demo.systems.sweep.is_some());
        assert!(parse(&["--tasks", "a", "--concurrency", "0"]).is_err());
        assert!(parse(&["--tasks", "a", "--json-details"]).is_err());
        assert!(parse(&["--tasks", "a", "--merge", "{\"ids\": []}"]).is_err());
        let c = parse(&[
            "--tasks",
            "a",
            "--merge",
            r#"{"ids": ["x", "y"], "merge_strategy": "ties", "density": 0.5}"#,
            "--merge",
            r#"[{"ids": ["x"]}, {"ids": ["y"]}]"#,
            "--no-base",
            "--limit",
            "3",
        ])
        .unwrap();
        assert_eq!(c.systems.merges.len(), 3);
        assert!(!c.systems.base);
        assert_eq!(c.limit, Some(3));
    }
}
