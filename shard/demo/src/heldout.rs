//! The held-out sets in `medley eval`'s JSONL form, one file per task:
//! `{"prompt": "...", "expected": "...", "score": "exact"}` per line, `expected` being the
//! completion without its leading space (the scorer trims both sides anyway).
//!
//! The committed sets under `tests/fixtures/demo/tasks/` are `write_heldout(dir, &HeldoutOptions
//! ::default())`: seed [`HELDOUT_SEED`], [`HELDOUT_N`] examples per task. Their prompts are held
//! out of every training set by construction ([`crate::split`]), whatever seed trains.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DemoError, Split, Task, generate};

/// Seed of the committed held-out sets.
pub const HELDOUT_SEED: u64 = 0;
/// Examples per task in the committed held-out sets.
pub const HELDOUT_N: usize = 100;

/// One line of an eval task file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The raw prompt sent to `/generate`.
    pub prompt: String,
    /// The expected generation.
    pub expected: String,
    /// The scoring rule: `exact`, `contains` or `regex`.
    pub score: String,
}

/// Which held-out sets to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldoutOptions {
    /// Generator seed.
    pub seed: u64,
    /// Examples per task.
    pub n: usize,
}

impl Default for HeldoutOptions {
    fn default() -> Self {
        Self {
            seed: HELDOUT_SEED,
            n: HELDOUT_N,
        }
    }
}

/// The held-out set of `task` as eval records (score rule `exact`).
pub fn heldout_records(task: Task, options: &HeldoutOptions) -> Vec<EvalRecord> {
    generate(task, Split::Heldout, options.seed, options.n)
        .into_iter()
        .map(|e| EvalRecord {
            prompt: e.prompt,
            expected: e.completion.trim().to_string(),
            score: "exact".into(),
        })
        .collect()
}

/// The held-out set of `task` as JSONL text (one record per line, each line ending in `\n`).
pub fn heldout_jsonl(task: Task, options: &HeldoutOptions) -> Result<String, DemoError> {
    let mut text = String::new();
    for record in heldout_records(task, options) {
        text.push_str(&serde_json::to_string(&record)?);
        text.push('\n');
    }
    Ok(text)
}

/// The file name of `task`'s held-out set (`sql.jsonl`...).
pub fn file_name(task: Task) -> String {
    format!("{}.jsonl", task.id())
}

/// Writes `sql.jsonl`, `ad.jsonl` and `instruct.jsonl` into `dir` (created if missing) and
/// returns their paths.
pub fn write_heldout(dir: &Path, options: &HeldoutOptions) -> Result<Vec<PathBuf>, DemoError> {
    std::fs::create_dir_all(dir)?;
    Task::ALL
        .into_iter()
        .map(|task| {
            let path = dir.join(file_name(task));
            std::fs::write(&path, heldout_jsonl(task, options)?)?;
            tracing::info!(task = task.id(), path = %path.display(), n = options.n, "wrote held-out set");
            Ok(path)
        })
        .collect()
}

/// Reads an eval JSONL file.
pub fn read_records(path: &Path) -> Result<Vec<EvalRecord>, DemoError> {
    std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(DemoError::from))
        .collect()
}
