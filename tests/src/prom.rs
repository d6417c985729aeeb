//! `/metrics` read through a real Prometheus text parser: the official Python client's
//! (`tests/python/parse_metrics.py`), which refuses malformed exposition text.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{Server, python_with_lorax_client, workspace_root};

/// One sample: its name (a histogram's `_bucket`/`_sum`/`_count`, a counter's `_total`), its
/// labels and its value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Sample name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value (`NaN`/`±Inf` as such).
    pub value: f64,
}

/// One metric family.
#[derive(Debug, Clone)]
pub struct Family {
    /// Family name (a counter's without `_total`).
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `summary`, `untyped`...
    pub kind: String,
    /// Its samples.
    pub samples: Vec<Sample>,
}

/// A parsed scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Every family, in exposition order.
    pub families: Vec<Family>,
    /// The raw text (for messages).
    pub text: String,
}

impl Scrape {
    /// Parses exposition `text` with the Python client's parser.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let python = python_with_lorax_client()?;
        let script = workspace_root().join("tests/python/parse_metrics.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting parse_metrics.py")?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "the Prometheus parser refused /metrics: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let parsed: Vec<Value> = serde_json::from_slice(&out.stdout)?;
        let families = parsed.iter().map(family).collect::<anyhow::Result<_>>()?;
        Ok(Self {
            families,
            text: text.to_string(),
        })
    }

    /// The family `name`.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The samples of family `name` whose labels include every pair of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.family(name)
            .into_iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// Sum of a counter's or gauge's samples matching `labels` (0 when there are none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }

    /// A histogram's observation count (0 when absent).
    pub fn histogram_count(&self, name: &str) -> f64 {
        let count = format!("{name}_count");
        self.samples(name, &[])
            .filter(|s| s.name == count)
            .map(|s| s.value)
            .sum()
    }
}

fn family(v: &Value) -> anyhow::Result<Family> {
    let text = |v: &Value, k: &str| -> anyhow::Result<String> {
        Ok(v[k]
            .as_str()
            .with_context(|| format!("no {k} in {v}"))?
            .to_string())
    };
    let samples = v["samples"]
        .as_array()
        .context("no samples")?
        .iter()
        .map(|s| {
            let labels = s["labels"]
                .as_object()
                .context("no labels")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = match &s["value"] {
                Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                Value::String(s) if s == "+Inf" => f64::INFINITY,
                Value::String(s) if s == "-Inf" => f64::NEG_INFINITY,
                _ => f64::NAN,
            };
            Ok(Sample {
                name: text(s, "name")?,
                labels,
                value,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Family {
        name: text(v, "name")?,
        kind: text(v, "type")?,
        samples,
    })
}

impl Server {
    /// `GET /metrics`, parsed.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        let (status, text) = self.get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}: {text}");
        }
        tokio::task::spawn_blocking(move || Scrape::parse(&text)).await?
    }
}
