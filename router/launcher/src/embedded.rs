//! The default model compiled into `medley`: the trained demo (`tests/fixtures/demo/`, made by
//! `medley-train demo`), a small Llama-family base model and three LoRA adapters, one per demo
//! task. It is written to disk on first use, so `medley serve` works offline on a fresh machine
//! without any argument, and the adapters answer to their hub ids ([`EMBEDDED_ADAPTERS`]) without
//! the hub.

use std::path::{Path, PathBuf};

use medley_shard::adapters::BuiltinAdapter;
use sha2::{Digest, Sha256};

use crate::staged::StagedContents;

/// Model id reported for the embedded model.
pub const EMBEDDED_MODEL_ID: &str = "medley-demo/base";

/// The embedded model's adapters: `(hub id, directory inside the model directory)`.
pub const EMBEDDED_ADAPTERS: [(&str, &str); 3] = [
    ("medley-demo/sql", "adapters/sql"),
    ("medley-demo/ad", "adapters/ad"),
    ("medley-demo/instruct", "adapters/instruct"),
];

macro_rules! demo_file {
    ($path:literal) => {
        (
            $path,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/demo/",
                $path
            ))
            .as_slice(),
        )
    };
}

/// The files of the embedded default model, by their path inside the model directory (the
/// base model's files at the top, as the shards read them; the adapters below `adapters/`).
static DEFAULT_FILES: [(&str, &[u8]); 11] = [
    rename(demo_file!("base/config.json"), "config.json"),
    rename(
        demo_file!("base/generation_config.json"),
        "generation_config.json",
    ),
    rename(demo_file!("base/model.safetensors"), "model.safetensors"),
    rename(demo_file!("base/tokenizer.json"), "tokenizer.json"),
    rename(
        demo_file!("base/tokenizer_config.json"),
        "tokenizer_config.json",
    ),
    demo_file!("adapters/sql/adapter_config.json"),
    demo_file!("adapters/sql/adapter_model.safetensors"),
    demo_file!("adapters/ad/adapter_config.json"),
    demo_file!("adapters/ad/adapter_model.safetensors"),
    demo_file!("adapters/instruct/adapter_config.json"),
    demo_file!("adapters/instruct/adapter_model.safetensors"),
];

const fn rename(
    file: (&'static str, &'static [u8]),
    name: &'static str,
) -> (&'static str, &'static [u8]) {
    (name, file.1)
}

/// The built-in adapters of the embedded model extracted into `model_dir`, for the shards'
/// `--builtin-adapter` flags.
pub fn builtin_adapters(model_dir: &Path) -> Vec<BuiltinAdapter> {
    EMBEDDED_ADAPTERS
        .iter()
        .map(|(id, sub)| BuiltinAdapter {
            id: id.to_string(),
            dir: model_dir.join(sub),
        })
        .collect()
}

/// A set of named files with a content hash, extracted into `<base>/<hash>/`.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModel {
    files: &'static [(&'static str, &'static [u8])],
}

/// Why the embedded model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No candidate directory could hold it.
    #[error("cannot write the embedded model to any of: {}", attempts.join("; "))]
    NoWritableDir {
        /// `dir: error` per candidate tried.
        attempts: Vec<String>,
    },
}

impl EmbeddedModel {
    /// The demo model compiled into this binary.
    pub fn default_model() -> Self {
        Self {
            files: &DEFAULT_FILES,
        }
    }

    /// File names and contents.
    pub fn files(&self) -> &'static [(&'static str, &'static [u8])] {
        self.files
    }

    /// Hex SHA-256 prefix over every file's name, length and bytes; names the extraction dir.
    pub fn content_hash(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, bytes) in self.files {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        hex::encode(&hasher.finalize()[..8])
    }

    /// Writes the model below the first usable directory of [`default_bases`] and returns the
    /// model directory.
    pub fn materialize(&self) -> Result<PathBuf, EmbeddedError> {
        self.materialize_in(&default_bases())
    }

    /// Writes the model below the first of `bases` where that works.
    pub fn materialize_in(&self, bases: &[PathBuf]) -> Result<PathBuf, EmbeddedError> {
        self.contents()
            .install_in(bases, &self.content_hash())
            .map_err(|attempts| EmbeddedError::NoWritableDir { attempts })
    }

    /// Returns `<base>/<hash>/` holding exactly these files, writing it if needed (idempotent
    /// and safe against concurrent launchers, see [`crate::staged`]).
    pub fn extract_to(&self, base: &Path) -> std::io::Result<PathBuf> {
        self.contents().install(base, &self.content_hash())
    }

    fn contents(&self) -> StagedContents<'static> {
        StagedContents {
            files: self.files,
            links: &[],
        }
    }
}

/// Candidate base directories: `$XDG_CACHE_HOME/medley/embedded`, `~/.cache/medley/embedded`,
/// then `<temp dir>/medley/embedded`.
pub fn default_bases() -> Vec<PathBuf> {
    crate::staged::cache_bases("embedded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_dir::check_model_dir;

    /// The embedded bytes are the committed demo files, and the extracted directory is a
    /// complete model whose adapters are where [`builtin_adapters`] says.
    #[test]
    fn embedded_bytes_are_the_demo_fixture() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/demo");
        let model = EmbeddedModel::default_model();
        for (name, bytes) in model.files() {
            let committed = if name.starts_with("adapters/") {
                demo.join(name)
            } else {
                demo.join("base").join(name)
            };
            let on_disk = std::fs::read(&committed).expect("fixture file");
            assert_eq!(on_disk, *bytes, "{name}");
        }
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = model.extract_to(tmp.path()).expect("extract");
        check_model_dir(&dir).expect("complete model");
        for b in builtin_adapters(&dir) {
            assert!(b.dir.join("adapter_config.json").is_file(), "{b:?}");
            assert!(b.id.starts_with("medley-demo/"), "{b:?}");
        }
    }

    #[test]
    fn extraction_is_complete_verified_and_idempotent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = EmbeddedModel::default_model();
        let dir = model.extract_to(tmp.path()).expect("extract");
        assert_eq!(dir, tmp.path().join(model.content_hash()));
        check_model_dir(&dir).expect("a complete model dir");
        let mtime = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .expect("mtime")
        };
        let before = mtime(&dir.join("model.safetensors"));
        // Second call reuses the directory untouched; no staging leftovers.
        assert_eq!(model.extract_to(tmp.path()).expect("again"), dir);
        assert_eq!(mtime(&dir.join("model.safetensors")), before);
        let entries: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            entries,
            vec![std::ffi::OsString::from(model.content_hash())]
        );
    }

    #[test]
    fn damaged_extraction_is_replaced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = EmbeddedModel::default_model();
        let dir = model.extract_to(tmp.path()).expect("extract");
        std::fs::write(dir.join("tokenizer.json"), b"truncated").expect("damage");
        std::fs::remove_file(dir.join("config.json")).expect("damage");
        let again = model.extract_to(tmp.path()).expect("repair");
        assert_eq!(again, dir);
        for (name, bytes) in model.files() {
            assert_eq!(
                std::fs::read(dir.join(name)).expect("read"),
                *bytes,
                "{name}"
            );
        }
    }

    #[test]
    fn concurrent_extractions_agree() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = EmbeddedModel::default_model();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| model.extract_to(tmp.path()).expect("extract")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert!(dirs.iter().all(|d| *d == dirs[0]));
        check_model_dir(&dirs[0]).expect("complete");
    }

    #[test]
    fn falls_back_past_unwritable_bases() {
        let tmp = tempfile::tempdir().expect("tmp");
        // A regular file where a directory is expected cannot hold the model, even as root.
        let blocked = tmp.path().join("blocked");
        std::fs::write(&blocked, b"").expect("file");
        let good = tmp.path().join("good");
        let model = EmbeddedModel::default_model();
        let dir = model
            .materialize_in(&[blocked.join("sub"), good.clone()])
            .expect("fallback");
        assert!(dir.starts_with(&good));
        let err = model
            .materialize_in(&[blocked.join("a"), blocked.join("b")])
            .expect_err("nothing writable");
        assert!(err.to_string().contains("blocked"), "{err}");
    }

    #[test]
    fn hash_depends_on_names_and_contents() {
        static A: [(&str, &[u8]); 1] = [("a", b"xy")];
        static B: [(&str, &[u8]); 1] = [("b", b"xy")];
        static C: [(&str, &[u8]); 1] = [("a", b"xz")];
        let hash = |files| EmbeddedModel { files }.content_hash();
        assert_ne!(hash(&A), hash(&B));
        assert_ne!(hash(&A), hash(&C));
        assert_eq!(hash(&A).len(), 16);
    }
}
