//! The systems an evaluation compares (the rows of its table): the base model, single adapters,
//! `--merge` specs and the `--sweep` grid, each with a short stable label.
//!
//! Labels: `base`; an adapter's id; a merge `STRATEGY[ d=DENSITY] w=W1,W2,..` plus
//! ` sign=frequency`, ` seed=N`, ` rank=R`, ` clamp=C` when given and ` [id1+id2]` when its ids are
//! not the `--adapters` list. A `--merge` spec may carry its own `"label"` instead.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::EvalError;

/// The merge strategies the server knows (LoRAX's four plus Medley's), lower case.
pub const STRATEGIES: [&str; 11] = [
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "cat",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
];

/// Whether `strategy` prunes by `density` (every strategy but `linear`, `cat` and `svd`).
pub fn uses_density(strategy: &str) -> bool {
    let s = strategy.to_ascii_lowercase();
    s.contains("ties") || s.contains("dare") || s.contains("magnitude_prune")
}

/// LoRAX's `merged_adapters` object (plus Medley's `seed`, `svd_rank`, `svd_clamp`), as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Adapter ids, in merge order.
    pub ids: Vec<String>,
    /// One weight per id (the server's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// Strategy name (server default `linear`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_strategy: Option<String>,
    /// Fraction kept by the pruning strategies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// `total` or `frequency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority_sign_method: Option<String>,
    /// Seed of DARE masks (server default: derived from the merge, so still deterministic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Rank of SVD-family results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd_rank: Option<u32>,
    /// PEFT's `svd_clamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd_clamp: Option<f64>,
}

impl MergeSpec {
    /// The strategy, lower case (`linear` when absent, as on the server).
    pub fn strategy(&self) -> String {
        self.merge_strategy
            .as_deref()
            .unwrap_or("linear")
            .to_ascii_lowercase()
    }

    /// The label of this merge (see the module docs); `adapters` is the `--adapters` list.
    pub fn label(&self, adapters: &[String]) -> String {
        let mut label = self.series_label(adapters);
        if let Some(d) = self.density.filter(|_| uses_density(&self.strategy())) {
            // The density goes right after the strategy.
            let strategy = self.strategy();
            label = format!("{strategy} d={d}{}", &label[strategy.len()..]);
        }
        label
    }

    /// The label without the density: merges that differ only in density share it (one chart
    /// line).
    pub fn series_label(&self, adapters: &[String]) -> String {
        let mut label = self.strategy();
        match &self.weights {
            Some(w) => {
                let _ = write!(label, " w={}", join_numbers(w));
            }
            None => label.push_str(" w=default"),
        }
        if let Some(m) = &self.majority_sign_method
            && !m.eq_ignore_ascii_case("total")
        {
            let _ = write!(label, " sign={}", m.to_ascii_lowercase());
        }
        if let Some(seed) = self.seed {
            let _ = write!(label, " seed={seed}");
        }
        if let Some(rank) = self.svd_rank {
            let _ = write!(label, " rank={rank}");
        }
        if let Some(clamp) = self.svd_clamp {
            let _ = write!(label, " clamp={clamp}");
        }
        if self.ids != adapters {
            let _ = write!(label, " [{}]", self.ids.join("+"));
        }
        label
    }
}

/// Numbers joined by commas, each in its shortest form (`1`, `0.7`).
pub fn join_numbers(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// What a system sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SystemKind {
    /// The base model (no adapter fields).
    Base,
    /// One adapter (`adapter_id`).
    Adapter {
        /// The adapter id.
        adapter_id: String,
    },
    /// A merge (`merged_adapters`).
    Merge {
        /// The merge as sent.
        merged_adapters: MergeSpec,
    },
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct System {
    /// Short stable label.
    pub label: String,
    /// What it sends.
    #[serde(flatten)]
    pub kind: SystemKind,
}

impl System {
    /// The merge, if this system is one.
    pub fn merge(&self) -> Option<&MergeSpec> {
        match &self.kind {
            SystemKind::Merge { merged_adapters } => Some(merged_adapters),
            _ => None,
        }
    }
}

/// The `--sweep` grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepGrid {
    /// Strategies, lower case.
    pub strategies: Vec<String>,
    /// Densities (used by the pruning strategies only).
    pub densities: Vec<f64>,
    /// Weight sets, each one weight per adapter.
    pub weights: Vec<Vec<f64>>,
    /// `majority_sign_method` for every merge of the grid (server default when absent).
    pub majority_sign_method: Option<String>,
    /// DARE seed for every merge of the grid (server default when absent).
    pub seed: Option<u64>,
}

/// A `--merge` spec with its optional own label, as parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeArg {
    /// The merge.
    pub spec: MergeSpec,
    /// `"label"` from the spec, if given.
    pub label: Option<String>,
}

/// Parses one `--merge` value: inline JSON or `@path`, holding one `merged_adapters` object or a
/// list of them; an object may carry a `"label"` for its row.
pub fn parse_merge_arg(value: &str) -> Result<Vec<MergeArg>, EvalError> {
    let err = |message: String| EvalError::MergeSpec {
        spec: value.to_string(),
        message,
    };
    let text = match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?,
        None => value.to_string(),
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let objects = match json {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    if objects.is_empty() {
        return Err(err("an empty list".into()));
    }
    objects
        .into_iter()
        .map(|mut object| {
            let label = match object.as_object_mut().and_then(|o| o.remove("label")) {
                None => None,
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s),
                Some(other) => {
                    return Err(err(format!(
                        "`label` must be a non-empty string, not {other}"
                    )));
                }
            };
            let spec: MergeSpec = serde_json::from_value(object).map_err(|e| err(e.to_string()))?;
            if spec.ids.is_empty() {
                return Err(err("`ids` is empty".into()));
            }
            if let Some(w) = &spec.weights
                && w.len() != spec.ids.len()
            {
                return Err(err(format!(
                    "{} weights for {} ids",
                    w.len(),
                    spec.ids.len()
                )));
            }
            Ok(MergeArg { spec, label })
        })
        .collect()
}

/// What [`build_systems`] builds the rows from.
#[derive(Debug, Clone, Default)]
pub struct SystemsConfig {
    /// Evaluate the base model.
    pub base: bool,
    /// `--adapters`, each evaluated alone (and the ids of the sweep's merges).
    pub adapters: Vec<String>,
    /// `--merge` specs.
    pub merges: Vec<MergeArg>,
    /// `--sweep`.
    pub sweep: Option<SweepGrid>,
}

/// Expands the sweep grid: strategy × weight set × density, in that nesting order; strategies
/// that do not prune (`linear`, `cat`, `svd`) once per weight set, without a density.
pub fn expand_sweep(grid: &SweepGrid, adapters: &[String]) -> Vec<MergeSpec> {
    let mut specs = Vec::new();
    for strategy in &grid.strategies {
        for weights in &grid.weights {
            let densities: Vec<Option<f64>> = if uses_density(strategy) {
                grid.densities.iter().copied().map(Some).collect()
            } else {
                vec![None]
            };
            for density in densities {
                specs.push(MergeSpec {
                    ids: adapters.to_vec(),
                    weights: Some(weights.clone()),
                    merge_strategy: Some(strategy.clone()),
                    density,
                    majority_sign_method: grid.majority_sign_method.clone(),
                    seed: grid.seed,
                    svd_rank: None,
                    svd_clamp: None,
                });
            }
        }
    }
    specs
}

/// The rows, in order: base, each adapter, each `--merge`, the sweep. A merge identical to an
/// earlier one is dropped; two different systems with one label are an error.
pub fn build_systems(config: &SystemsConfig) -> Result<Vec<System>, EvalError> {
    let mut systems: Vec<System> = Vec::new();
    if config.base {
        systems.push(System {
            label: "base".into(),
            kind: SystemKind::Base,
        });
    }
    for id in &config.adapters {
        systems.push(System {
            label: id.clone(),
            kind: SystemKind::Adapter {
                adapter_id: id.clone(),
            },
        });
    }
    let explicit = config.merges.iter().map(|m| {
        let label = m
            .label
            .clone()
            .unwrap_or_else(|| m.spec.label(&config.adapters));
        (label, m.spec.clone())
    });
    let swept = config
        .sweep
        .iter()
        .flat_map(|grid| expand_sweep(grid, &config.adapters))
        .map(|spec| (spec.label(&config.adapters), spec));
    for (label, spec) in explicit.chain(swept) {
        if systems.iter().any(|s| s.merge() == Some(&spec)) {
            tracing::debug!(%label, "skipping a merge evaluated already");
            continue;
        }
        systems.push(System {
            label,
            kind: SystemKind::Merge {
                merged_adapters: spec,
            },
        });
    }
    for (i, s) in systems.iter().enumerate() {
        if systems[..i].iter().any(|o| o.label == s.label) {
            return Err(EvalError::Args(format!(
                "two different systems are labelled `{}` (give a --merge its own \"label\")",
                s.label
            )));
        }
    }
    Ok(systems)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ids() -> Vec<String> {
        vec!["sql".into(), "chat".into(), "ads".into()]
    }

    fn grid() -> SweepGrid {
        SweepGrid {
            strategies: ["linear", "ties", "dare_linear", "dare_ties"]
                .map(String::from)
                .to_vec(),
            densities: vec![0.1, 0.3, 0.5, 0.7, 1.0],
            weights: vec![vec![1.0, 1.0, 1.0], vec![0.7, 0.7, 0.7]],
            majority_sign_method: None,
            seed: None,
        }
    }

    #[test]
    fn sweep_counts_and_linear_collapses_density() {
        let specs = expand_sweep(&grid(), &ids());
        // linear: 2 weight sets; the three pruning strategies: 2 × 5 each.
        assert_eq!(specs.len(), 2 + 3 * 2 * 5);
        let linear: Vec<_> = specs.iter().filter(|s| s.strategy() == "linear").collect();
        assert_eq!(linear.len(), 2);
        assert!(linear.iter().all(|s| s.density.is_none()));
        assert!(
            specs
                .iter()
                .filter(|s| s.strategy() != "linear")
                .all(|s| s.density.is_some())
        );
    }

    #[test]
    fn sweep_labels_are_short_unique_and_ordered() {
        let labels: Vec<String> = expand_sweep(&grid(), &ids())
            .iter()
            .map(|s| s.label(&ids()))
            .collect();
        assert_eq!(labels[0], "linear w=1,1,1");
        assert_eq!(labels[1], "linear w=0.7,0.7,0.7");
        assert_eq!(labels[2], "ties d=0.1 w=1,1,1");
        assert_eq!(labels[6], "ties d=1 w=1,1,1");
        assert_eq!(labels[7], "ties d=0.1 w=0.7,0.7,0.7");
        assert_eq!(labels.last().unwrap(), "dare_ties d=1 w=0.7,0.7,0.7");
        let mut unique = labels.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), labels.len());
    }

    #[test]
    fn labels_show_what_differs_from_the_defaults() {
        let spec = MergeSpec {
            ids: vec!["sql".into(), "chat".into()],
            weights: Some(vec![2.0, 0.3]),
            merge_strategy: Some("TIES".into()),
            density: Some(0.2),
            majority_sign_method: Some("frequency".into()),
            seed: Some(3),
            svd_rank: None,
            svd_clamp: None,
        };
        assert_eq!(
            spec.label(&ids()),
            "ties d=0.2 w=2,0.3 sign=frequency seed=3 [sql+chat]"
        );
        assert_eq!(
            spec.series_label(&ids()),
            "ties w=2,0.3 sign=frequency seed=3 [sql+chat]"
        );
        let plain = MergeSpec {
            ids: ids(),
            weights: None,
            merge_strategy: None,
            density: Some(0.5),
            majority_sign_method: Some("total".into()),
            seed: None,
            svd_rank: None,
            svd_clamp: None,
        };
        // linear ignores the density, so the label does too.
        assert_eq!(plain.label(&ids()), "linear w=default");
    }

    #[test]
    fn systems_are_ordered_and_deduplicated() {
        let merges = parse_merge_arg(
            r#"[{"ids": ["sql", "chat", "ads"], "weights": [1, 1, 1], "merge_strategy": "ties", "density": 0.5},
                {"ids": ["sql", "chat"], "weights": [1, 1], "label": "pair"}]"#,
        )
        .unwrap();
        let systems = build_systems(&SystemsConfig {
            base: true,
            adapters: ids(),
            merges,
            sweep: Some(grid()),
        })
        .unwrap();
        let labels: Vec<&str> = systems.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            &labels[..6],
            ["base", "sql", "chat", "ads", "ties d=0.5 w=1,1,1", "pair"]
        );
        // The sweep's copy of the explicit ties merge is dropped.
        assert_eq!(systems.len(), 6 + 32 - 1);
        assert_eq!(
            labels
                .iter()
                .filter(|l| **l == "ties d=0.5 w=1,1,1")
                .count(),
            1
        );
    }

    #[test]
    fn a_label_clash_is_an_error() {
        let merges =
            parse_merge_arg(r#"[{"ids": ["a"], "label": "x"}, {"ids": ["b"], "label": "x"}]"#)
                .unwrap();
        let err = build_systems(&SystemsConfig {
            merges,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
    }

    #[test]
    fn merge_args_are_checked() {
        assert!(parse_merge_arg("{").is_err());
        assert!(parse_merge_arg(r#"{"ids": []}"#).is_err());
        assert!(parse_merge_arg(r#"{"ids": ["a"], "weights": [1, 2]}"#).is_err());
        assert!(parse_merge_arg(r#"{"ids": ["a"], "wieghts": [1]}"#).is_err());
        assert!(parse_merge_arg(r#"{"ids": ["a"], "label": 3}"#).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, r#"{"ids": ["a", "b"], "merge_strategy": "dare_ties", "density": 0.3, "majority_sign_method": null}"#).unwrap();
        let parsed = parse_merge_arg(&format!("@{}", path.display())).unwrap();
        assert_eq!(parsed[0].spec.strategy(), "dare_ties");
        assert!(parse_merge_arg("@/nonexistent/m.json").is_err());
    }
}
