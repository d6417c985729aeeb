//! On-disk repository layouts (Hugging Face layout) and their completeness checks: a
//! [`RepoLayout`] names the files a kind of repository must and may hold; [`MODEL_LAYOUT`] is a
//! servable model, and other kinds (PEFT adapters) describe themselves the same way.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// The model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer in `tokenizers` JSON format.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Unsharded weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights (`weight_map`: tensor name → shard file).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Files used when present, never required.
pub const OPTIONAL_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Safetensors weights stored either as one file or as an index plus the shards it names (or,
/// where the layout allows it, a GGUF file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardedWeights {
    /// The single-file name (`model.safetensors`).
    pub single: &'static str,
    /// The index name (`model.safetensors.index.json`).
    pub index: &'static str,
    /// The GGUF file name of a GGUF model view (`model.gguf`, see [`crate::gguf`]).
    pub gguf: Option<&'static str>,
}

/// What a kind of repository directory must and may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepoLayout {
    /// The kind, for messages (`model`, `adapter`).
    pub kind: &'static str,
    /// Files that must exist.
    pub required: &'static [&'static str],
    /// Files used (and downloaded) when the repository has them.
    pub optional: &'static [&'static str],
    /// Weights that may be single-file or sharded; `None` when the weights are a plain entry of
    /// `required`.
    pub weights: Option<ShardedWeights>,
}

/// A servable model: config, tokenizer, single or sharded safetensors weights.
pub const MODEL_LAYOUT: RepoLayout = RepoLayout {
    kind: "model",
    required: &[CONFIG_FILE, TOKENIZER_FILE],
    optional: &OPTIONAL_FILES,
    weights: Some(ShardedWeights {
        single: WEIGHTS_FILE,
        index: WEIGHTS_INDEX_FILE,
        gguf: Some(crate::gguf::GGUF_FILE),
    }),
};

/// Where the weights of a model are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// One `model.safetensors`.
    Single(PathBuf),
    /// `model.safetensors.index.json` and every shard it names (sorted, deduplicated).
    Sharded {
        /// The index file.
        index: PathBuf,
        /// The shard files.
        shards: Vec<PathBuf>,
    },
    /// A GGUF file (`model.gguf` of a view directory written from it).
    Gguf(PathBuf),
}

/// A complete repository directory of some [`RepoLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The weights, for layouts with [`RepoLayout::weights`].
    pub weights: Option<Weights>,
}

/// A complete model directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The directory passed to the shards as `--model-dir`.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `tokenizer.json` (given to the router for validation).
    pub tokenizer: PathBuf,
    /// The weights.
    pub weights: Weights,
}

impl ModelFiles {
    /// The model view of a directory checked against [`MODEL_LAYOUT`].
    pub fn from_repo(files: RepoFiles) -> Result<Self, ModelDirError> {
        match files.weights {
            Some(weights) => Ok(Self {
                config: files.dir.join(CONFIG_FILE),
                tokenizer: files.dir.join(TOKENIZER_FILE),
                dir: files.dir,
                weights,
            }),
            None => Err(ModelDirError::Missing {
                kind: MODEL_LAYOUT.kind,
                dir: files.dir,
                missing: vec![format!("{WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")],
            }),
        }
    }
}

/// Why a directory is not a complete repository of its layout.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// The path does not exist or is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Required files are absent.
    #[error("{kind} directory {dir} is missing {}", missing.join(", "))]
    Missing {
        /// The layout's kind (`model`, `adapter`).
        kind: &'static str,
        /// The directory.
        dir: PathBuf,
        /// What is missing, in words (file names, or "model.safetensors or model.safetensors.index.json").
        missing: Vec<String>,
    },
    /// The weight index cannot be used.
    #[error("invalid weight index {path}: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Checks that `dir` holds every file `layout` requires and returns them.
pub fn check_repo_dir(dir: &Path, layout: &RepoLayout) -> Result<RepoFiles, ModelDirError> {
    if !dir.is_dir() {
        return Err(ModelDirError::NotADirectory(dir.to_path_buf()));
    }
    let mut missing: Vec<String> = layout
        .required
        .iter()
        .filter(|name| !dir.join(name).is_file())
        .map(|name| name.to_string())
        .collect();
    let weights = match layout.weights {
        None => None,
        Some(rule) => {
            let single = dir.join(rule.single);
            let index = dir.join(rule.index);
            if single.is_file() {
                Some(Weights::Single(single))
            } else if index.is_file() {
                let names = index_shard_names(&index)?;
                let mut shards = Vec::with_capacity(names.len());
                for name in names {
                    let path = dir.join(&name);
                    if !path.is_file() {
                        missing.push(format!("{name} (named by {})", rule.index));
                    }
                    shards.push(path);
                }
                Some(Weights::Sharded { index, shards })
            } else if let Some(gguf) = rule.gguf.map(|name| dir.join(name))
                && gguf.is_file()
            {
                Some(Weights::Gguf(gguf))
            } else {
                missing.push(format!("{} or {}", rule.single, rule.index));
                None
            }
        }
    };
    if missing.is_empty() {
        Ok(RepoFiles {
            dir: dir.to_path_buf(),
            weights,
        })
    } else {
        Err(ModelDirError::Missing {
            kind: layout.kind,
            dir: dir.to_path_buf(),
            missing,
        })
    }
}

/// Checks that `dir` holds everything a shard and the router need and returns their paths.
pub fn check_model_dir(dir: &Path) -> Result<ModelFiles, ModelDirError> {
    ModelFiles::from_repo(check_repo_dir(dir, &MODEL_LAYOUT)?)
}

/// The shard files a `model.safetensors.index.json` names, sorted and deduplicated.
///
/// Names must be plain relative paths inside the model directory (no `..`, no absolute paths).
pub fn index_shard_names(index: &Path) -> Result<Vec<String>, ModelDirError> {
    let bad = |reason: String| ModelDirError::BadIndex {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("the file of tensor `{tensor}` is not a string")))?;
        let plain = !file.is_empty()
            && Path::new(file)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(bad(format!(
                "tensor `{tensor}` points outside the model directory: `{file}`"
            )));
        }
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(names.into_iter().collect())
}

/// Helpers for tests of model-directory consumers (here and in the launcher).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// The committed tiny checkpoint (single `model.safetensors`).
    pub fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
    }

    /// Copies the fixture into `dest` (created).
    pub fn copy_fixture(dest: &Path) {
        std::fs::create_dir_all(dest).expect("mkdir");
        for entry in std::fs::read_dir(fixture_dir()).expect("fixture dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dest.join(entry.file_name())).expect("copy");
        }
    }

    /// Writes a sharded layout into `dir`: the fixture's config/tokenizer, an index naming
    /// `shards`, and (empty) shard files for the names in `present`.
    pub fn write_sharded(dir: &Path, shards: &[&str], present: &[&str]) {
        copy_fixture(dir);
        std::fs::remove_file(dir.join(WEIGHTS_FILE)).expect("rm weights");
        let map: serde_json::Map<_, _> = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("t{i}"), serde_json::Value::from(*s)))
            .collect();
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join(WEIGHTS_INDEX_FILE), index.to_string()).expect("index");
        for p in present {
            std::fs::write(dir.join(p), b"x").expect("shard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn fixture_is_complete() {
        let files = check_model_dir(&fixture_dir()).expect("fixture complete");
        assert_eq!(files.tokenizer, fixture_dir().join(TOKENIZER_FILE));
        assert_eq!(
            files.weights,
            Weights::Single(fixture_dir().join(WEIGHTS_FILE))
        );
    }

    #[test]
    fn missing_files_are_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        copy_fixture(tmp.path());
        std::fs::remove_file(tmp.path().join(TOKENIZER_FILE)).expect("rm");
        std::fs::remove_file(tmp.path().join(WEIGHTS_FILE)).expect("rm");
        let err = check_model_dir(tmp.path()).expect_err("incomplete");
        let msg = err.to_string();
        assert!(msg.contains("tokenizer.json"), "{msg}");
        assert!(
            msg.contains("model.safetensors or model.safetensors.index.json"),
            "{msg}"
        );
        assert!(!msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn other_layouts_use_the_same_check() {
        const LAYOUT: RepoLayout = RepoLayout {
            kind: "adapter",
            required: &["adapter_config.json", "adapter_model.safetensors"],
            optional: &[],
            weights: None,
        };
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("adapter_config.json"), b"{}").expect("w");
        let msg = check_repo_dir(tmp.path(), &LAYOUT)
            .expect_err("no weights")
            .to_string();
        assert!(
            msg.starts_with("adapter directory") && msg.ends_with("adapter_model.safetensors"),
            "{msg}"
        );
        std::fs::write(tmp.path().join("adapter_model.safetensors"), b"x").expect("w");
        let files = check_repo_dir(tmp.path(), &LAYOUT).expect("complete");
        assert_eq!((files.dir.as_path(), files.weights), (tmp.path(), None));
        // The fixture model is not an adapter.
        assert!(check_repo_dir(&fixture_dir(), &LAYOUT).is_err());
    }

    #[test]
    fn not_a_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").expect("write");
        assert!(matches!(
            check_model_dir(&file),
            Err(ModelDirError::NotADirectory(_))
        ));
        assert!(matches!(
            check_model_dir(&tmp.path().join("nope")),
            Err(ModelDirError::NotADirectory(_))
        ));
    }

    #[test]
    fn sharded_index_complete_and_missing_shard() {
        let tmp = tempfile::tempdir().expect("tmp");
        let names = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        write_sharded(tmp.path(), &[names[1], names[0], names[1]], &names);
        let files = check_model_dir(tmp.path()).expect("complete");
        match files.weights {
            Weights::Sharded { shards, .. } => {
                assert_eq!(shards, names.map(|n| tmp.path().join(n)).to_vec())
            }
            other => panic!("expected sharded, got {other:?}"),
        }
        std::fs::remove_file(tmp.path().join(names[1])).expect("rm");
        let msg = check_model_dir(tmp.path())
            .expect_err("missing")
            .to_string();
        assert!(msg.contains(names[1]), "{msg}");
        assert!(!msg.contains(names[0]), "{msg}");
    }

    #[test]
    fn index_escaping_the_directory_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        for evil in ["../x.safetensors", "/etc/passwd", ""] {
            write_sharded(tmp.path(), &[evil], &[]);
            let err = check_model_dir(tmp.path()).expect_err("bad index");
            assert!(
                matches!(err, ModelDirError::BadIndex { .. }),
                "{evil}: {err}"
            );
        }
        std::fs::write(tmp.path().join(WEIGHTS_INDEX_FILE), b"{not json").expect("w");
        assert!(matches!(
            check_model_dir(tmp.path()),
            Err(ModelDirError::BadIndex { .. })
        ));
    }
}
