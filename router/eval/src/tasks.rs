//! Task files (JSONL, one example per line) and the scoring rules.
//!
//! A line is `{"prompt": "...", "expected": "...", "score": "exact" | "contains" | "regex"}` with
//! optional `"max_new_tokens"` (a positive integer) and `"stop"` (a list of stop sequences); other
//! keys (an `"id"`, say) are ignored. Blank lines are skipped. The task's name is the file stem.
//!
//! Scoring rules, applied to the generated text (the prompt is never part of it):
//! * `exact`: the output with surrounding whitespace trimmed equals `expected` trimmed.
//! * `contains`: `expected`, exactly as written (not trimmed), occurs in the untrimmed output.
//!   An empty `expected` is refused (it would always match).
//! * `regex`: `expected` is a regular expression (Rust `regex` syntax) searched for in the
//!   trimmed output. The search is unanchored: anchor it yourself with `^…$` (without the `(?m)`
//!   flag `^` and `$` match only at the ends of the trimmed output, so `^\d+$` accepts
//!   `"  42\n"` but not `"42 apples"`). Each regex is compiled once, when the file is loaded.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use crate::error::EvalError;

/// How an output is compared with the expected answer.
#[derive(Debug, Clone)]
pub enum ScoreRule {
    /// Trimmed output equals trimmed `expected`.
    Exact(String),
    /// `expected` occurs in the output.
    Contains(String),
    /// The compiled `expected` matches somewhere in the trimmed output.
    Regex(Regex),
}

impl ScoreRule {
    /// Builds the rule named `name` for `expected`; the error says what is wrong.
    pub fn new(name: &str, expected: &str) -> Result<Self, String> {
        match name {
            "exact" => Ok(Self::Exact(expected.trim().to_string())),
            "contains" if expected.is_empty() => {
                Err("`expected` is empty: a `contains` rule would always match".into())
            }
            "contains" => Ok(Self::Contains(expected.to_string())),
            "regex" => Regex::new(expected)
                .map(Self::Regex)
                .map_err(|e| format!("invalid regex in `expected`: {e}")),
            other => Err(format!(
                "unknown score rule `{other}` (expected `exact`, `contains` or `regex`)"
            )),
        }
    }

    /// The rule's name as written in task files.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Exact(_) => "exact",
            Self::Contains(_) => "contains",
            Self::Regex(_) => "regex",
        }
    }

    /// Whether `output` scores as correct.
    pub fn matches(&self, output: &str) -> bool {
        match self {
            Self::Exact(expected) => output.trim() == expected,
            Self::Contains(expected) => output.contains(expected.as_str()),
            Self::Regex(re) => re.is_match(output.trim()),
        }
    }
}

/// One example of a task.
#[derive(Debug, Clone)]
pub struct Example {
    /// The prompt sent as `inputs`.
    pub prompt: String,
    /// The scoring rule (holding the expected answer).
    pub rule: ScoreRule,
    /// Per-example `max_new_tokens` (else the run's default).
    pub max_new_tokens: Option<u32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The 1-based line of the task file it came from.
    pub line: usize,
}

/// A task: a named set of examples.
#[derive(Debug, Clone)]
pub struct Task {
    /// The file stem.
    pub name: String,
    /// The file it was read from.
    pub path: PathBuf,
    /// The examples, in file order.
    pub examples: Vec<Example>,
}

/// A task file line as written.
#[derive(Debug, Deserialize)]
struct RawExample {
    prompt: String,
    expected: String,
    score: String,
    #[serde(default)]
    max_new_tokens: Option<u32>,
    #[serde(default)]
    stop: Option<Vec<String>>,
}

/// Parses the JSONL `text` of the task file `path` (whose stem names the task).
pub fn parse_task(path: &Path, text: &str) -> Result<Task, EvalError> {
    let err = |line: usize, message: String| EvalError::TaskFile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            err(
                0,
                "the file name has no usable stem to name the task".into(),
            )
        })?
        .to_string();
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawExample = serde_json::from_str(line).map_err(|e| err(number, e.to_string()))?;
        let rule = ScoreRule::new(&raw.score, &raw.expected).map_err(|m| err(number, m))?;
        if raw.max_new_tokens == Some(0) {
            return Err(err(number, "`max_new_tokens` must be at least 1".into()));
        }
        examples.push(Example {
            prompt: raw.prompt,
            rule,
            max_new_tokens: raw.max_new_tokens,
            stop: raw.stop.unwrap_or_default(),
            line: number,
        });
    }
    if examples.is_empty() {
        return Err(err(0, "no examples (the file is empty or blank)".into()));
    }
    Ok(Task {
        name,
        path: path.to_path_buf(),
        examples,
    })
}

/// The demo's held-out task sets (`tests/fixtures/demo/tasks/`, written by `medley-demo-data
/// tasks`), compiled in: what `medley eval` scores without `--tasks`.
const DEMO_TASKS: [(&str, &str); 3] = [
    (
        "demo/sql.jsonl",
        include_str!("../../../tests/fixtures/demo/tasks/sql.jsonl"),
    ),
    (
        "demo/ad.jsonl",
        include_str!("../../../tests/fixtures/demo/tasks/ad.jsonl"),
    ),
    (
        "demo/instruct.jsonl",
        include_str!("../../../tests/fixtures/demo/tasks/instruct.jsonl"),
    ),
];

/// Reads and parses every task file, keeping at most `limit` examples of each; task names
/// (file stems) must be distinct. No paths: the demo's held-out sets.
pub fn load_tasks(paths: &[PathBuf], limit: Option<usize>) -> Result<Vec<Task>, EvalError> {
    let demo: Vec<(PathBuf, Option<&str>)> = DEMO_TASKS
        .iter()
        .map(|(p, text)| (PathBuf::from(p), Some(*text)))
        .collect();
    let files: Vec<(PathBuf, Option<&str>)> = paths.iter().map(|p| (p.clone(), None)).collect();
    let sources = if paths.is_empty() { demo } else { files };
    let mut tasks: Vec<Task> = Vec::with_capacity(sources.len());
    for (path, embedded) in &sources {
        let text = match embedded {
            Some(text) => (*text).to_string(),
            None => std::fs::read_to_string(path).map_err(|source| EvalError::TaskIo {
                path: path.clone(),
                source,
            })?,
        };
        let mut task = parse_task(path, &text)?;
        if let Some(limit) = limit {
            task.examples.truncate(limit);
        }
        if let Some(other) = tasks.iter().find(|t| t.name == task.name) {
            return Err(EvalError::Args(format!(
                "two task files are both named `{}`: {} and {}",
                task.name,
                other.path.display(),
                path.display()
            )));
        }
        tracing::debug!(task = %task.name, examples = task.examples.len(), "loaded task");
        tasks.push(task);
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rule(name: &str, expected: &str) -> ScoreRule {
        ScoreRule::new(name, expected).unwrap()
    }

    fn parse(text: &str) -> Result<Task, EvalError> {
        parse_task(Path::new("dir/sql.jsonl"), text)
    }

    fn error_line(text: &str) -> (usize, String) {
        match parse(text).unwrap_err() {
            EvalError::TaskFile { line, message, .. } => (line, message),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn exact_trims_both_sides_and_nothing_else() {
        let r = rule("exact", "  SELECT 1\n");
        assert!(r.matches("SELECT 1"));
        assert!(r.matches("\n\t SELECT 1  \n"));
        assert!(!r.matches("SELECT  1"));
        assert!(!r.matches("select 1"));
        assert!(!r.matches("SELECT 1;"));
        assert!(rule("exact", "").matches("  \n"));
    }

    #[test]
    fn contains_is_a_raw_substring() {
        let r = rule("contains", "42");
        assert!(r.matches("the answer is 42."));
        assert!(!r.matches("4 2"));
        // `expected` is not trimmed: its spaces must be in the output.
        let spaced = rule("contains", " 42");
        assert!(spaced.matches("is 42"));
        assert!(!spaced.matches("42"));
        assert!(ScoreRule::new("contains", "").is_err());
    }

    #[test]
    fn regex_searches_the_trimmed_output_unanchored() {
        let r = rule("regex", r"\d+");
        assert!(r.matches("it is 42 apples"));
        assert!(!r.matches("none"));
        let anchored = rule("regex", r"^\d+$");
        assert!(anchored.matches("  42\n"));
        assert!(!anchored.matches("42 apples"));
        assert!(!anchored.matches("a\n42"));
        // Multi-line mode is opt-in.
        assert!(rule("regex", r"(?m)^\d+$").matches("a\n42"));
    }

    #[test]
    fn parses_examples_and_skips_blank_lines() {
        let task = parse(concat!(
            "{\"prompt\": \"p1\", \"expected\": \"a\", \"score\": \"exact\"}\n",
            "\n   \n",
            "{\"prompt\": \"p2\", \"expected\": \"b\", \"score\": \"contains\", \"max_new_tokens\": 5, \"stop\": [\"\\n\"], \"id\": 7}\n",
        ))
        .unwrap();
        assert_eq!(task.name, "sql");
        assert_eq!(task.examples.len(), 2);
        assert_eq!(task.examples[0].line, 1);
        assert_eq!(task.examples[1].line, 4);
        assert_eq!(task.examples[1].max_new_tokens, Some(5));
        assert_eq!(task.examples[1].stop, vec!["\n".to_string()]);
        assert_eq!(task.examples[1].rule.name(), "contains");
    }

    const GOOD: &str = "{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"exact\"}\n";

    #[test]
    fn bad_json_names_its_line() {
        let (line, message) = error_line(&format!("{GOOD}{GOOD}{{\"prompt\": \"p\",\n"));
        assert_eq!(line, 3);
        assert!(message.contains("EOF"), "{message}");
        let err = parse(&format!("{GOOD}\n{GOOD}not json\n")).unwrap_err();
        assert!(err.to_string().starts_with("dir/sql.jsonl:4: "), "{err}");
    }

    #[test]
    fn missing_expected_names_its_line() {
        let (line, message) = error_line(&format!(
            "{GOOD}{{\"prompt\": \"p\", \"score\": \"exact\"}}\n"
        ));
        assert_eq!(line, 2);
        assert!(message.contains("missing field `expected`"), "{message}");
    }

    #[test]
    fn unknown_rule_names_its_line() {
        let (line, message) = error_line(&format!(
            "{{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"fuzzy\"}}\n{GOOD}"
        ));
        assert_eq!(line, 1);
        assert!(message.contains("unknown score rule `fuzzy`"), "{message}");
    }

    #[test]
    fn bad_regex_names_its_line() {
        let (line, message) = error_line(&format!(
            "{GOOD}{GOOD}\n{{\"prompt\": \"p\", \"expected\": \"(unclosed\", \"score\": \"regex\"}}\n"
        ));
        assert_eq!(line, 4);
        assert!(message.contains("invalid regex"), "{message}");
    }

    #[test]
    fn other_bad_lines() {
        let (line, _) = error_line(
            "{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"exact\", \"max_new_tokens\": 0}\n",
        );
        assert_eq!(line, 1);
        let (line, _) = error_line(&format!(
            "{GOOD}{{\"prompt\": \"p\", \"expected\": \"a\", \"score\": \"exact\", \"stop\": \"x\"}}\n"
        ));
        assert_eq!(line, 2);
    }

    #[test]
    fn an_empty_set_is_an_error() {
        let err = parse("\n  \n").unwrap_err();
        assert!(matches!(err, EvalError::TaskFile { line: 0, .. }));
        assert!(err.to_string().contains("no examples"), "{err}");
    }

    /// Without task files, the demo's three held-out sets (compiled in) are scored.
    #[test]
    fn no_paths_load_the_demo_sets() {
        let tasks = load_tasks(&[], Some(5)).unwrap();
        let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["sql", "ad", "instruct"]);
        assert!(tasks.iter().all(|t| t.examples.len() == 5));
        assert_eq!(load_tasks(&[], None).unwrap()[0].examples.len(), 100);
    }

    #[test]
    fn load_applies_the_limit_and_refuses_duplicate_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("chat.jsonl");
        std::fs::write(&a, GOOD.repeat(5)).unwrap();
        let tasks = load_tasks(std::slice::from_ref(&a), Some(2)).unwrap();
        assert_eq!(tasks[0].examples.len(), 2);
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let b = dir.path().join("b/chat.jsonl");
        std::fs::write(&b, GOOD).unwrap();
        assert!(matches!(load_tasks(&[a, b], None), Err(EvalError::Args(_))));
        let missing = load_tasks(&[dir.path().join("nope.jsonl")], None).unwrap_err();
        assert!(matches!(missing, EvalError::TaskIo { .. }));
    }
}
