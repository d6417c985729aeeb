//! Turns `--model` into a complete model directory: a local `.gguf` file (or a directory holding
//! one and no `config.json`), seen through a model view directory written once under the cache;
//! else a local directory; else a hub id found in the Hugging Face cache, else downloaded (unless
//! `HF_HUB_OFFLINE`); and without `--model` the model embedded in the binary.
//!
//! A hub repository of GGUF files (many quantizations, no `config.json`) is served one file at
//! a time (`hub_gguf`): `--gguf-file NAME`, a quantization tag (`--model owner/repo:Q4_K_M`),
//! or the repository's only `.gguf` file; that file alone is downloaded (or found in the cache)
//! and served like a local GGUF file.

use std::path::{Path, PathBuf};

use super::embedded::{EMBEDDED_MODEL_ID, EmbeddedError, EmbeddedModel};
use super::hub::{
    CacheLookup, DEFAULT_REVISION, DownloadError, HubSettings, download_listed, is_valid_repo_id,
    list_repo, lookup_cache,
};
use super::model_dir::{CONFIG_FILE, MODEL_LAYOUT, ModelDirError, ModelFiles, check_model_dir};
use crate::staged::StagedContents;
use gguf_pick::Selector;
use hub_gguf::{HubGguf, selector, split_tag};
use medley_hub::gguf::{GGUF_FILE, GgufMetadata, find_gguf};

mod gguf_pick;
mod hub_gguf;
#[cfg(test)]
mod hub_gguf_tests;

/// What to resolve.
#[derive(Debug, Clone)]
pub struct ResolveRequest {
    /// `--model`; `None` selects the embedded model.
    pub model: Option<String>,
    /// `--revision`; `None` means `main`.
    pub revision: Option<String>,
    /// `--gguf-file`: the `.gguf` file of the hub repository `model` to serve.
    pub gguf_file: Option<String>,
    /// Hub access and cache location.
    pub hub: HubSettings,
    /// Where the embedded model may be written, in order of preference.
    pub embedded_bases: Vec<PathBuf>,
    /// Where views of GGUF files may be written, in order of preference.
    pub gguf_bases: Vec<PathBuf>,
}

/// Where a resolved model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory given as `--model`.
    LocalDir,
    /// A local GGUF file (or a directory holding one) given as `--model`.
    LocalGguf,
    /// Found complete in the Hugging Face cache.
    HubCache,
    /// Downloaded from the hub just now.
    HubDownload,
    /// The model compiled into the binary.
    Embedded,
}

/// A model ready to be served.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The id reported to clients and passed to the shards.
    pub model_id: String,
    /// Its files.
    pub files: ModelFiles,
    /// Where it came from.
    pub source: ModelSource,
}

/// Why no model could be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// `--model` names a local directory that is not a complete model.
    #[error("--model {model}: {source}")]
    LocalDir {
        /// The argument.
        model: String,
        /// What is wrong with the directory.
        source: ModelDirError,
    },
    /// `--model` names a GGUF file Medley cannot serve, or its view cannot be written.
    #[error("--model {model}: {reason}")]
    Gguf {
        /// The argument.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// `--model` is neither an existing directory nor a hub id.
    #[error("--model {0}: no such directory, and not a hub id of the form `org/name`")]
    NotFound(String),
    /// No cache directory could be determined (no `HOME`).
    #[error(
        "cannot locate the Hugging Face cache: pass --huggingface-hub-cache or set HF_HUB_CACHE or HF_HOME"
    )]
    NoCacheDir,
    /// Offline and the cache does not have it.
    #[error(
        "{repo_id}@{revision} is not in the Hugging Face cache at {} ({detail}) and HF_HUB_OFFLINE=1",
        cache_dir.display()
    )]
    Offline {
        /// The hub id.
        repo_id: String,
        /// The revision.
        revision: String,
        /// The cache that was searched.
        cache_dir: PathBuf,
        /// What the cache has.
        detail: String,
    },
    /// The download failed.
    #[error("--model {repo_id}: {source}")]
    Download {
        /// The hub id.
        repo_id: String,
        /// The failure (boxed: it is large and rare).
        source: Box<DownloadError>,
    },
    /// The embedded model could not be written to disk.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// Flags that cannot go together or a malformed value (e.g. `--gguf-file` with a local
    /// `--model`).
    #[error("{0}")]
    Argument(String),
    /// A hub repository without one GGUF file the flags select (none or several match, a split
    /// file, a repository without GGUF files); the reason names the candidates.
    #[error("--model {repo_id}@{revision}: {reason}")]
    GgufChoice {
        /// The hub id.
        repo_id: String,
        /// The revision.
        revision: String,
        /// What is wrong, with the repository's `.gguf` files.
        reason: String,
    },
}

impl ResolveError {
    /// True for errors in the arguments themselves (wrong flag combinations, a GGUF file or tag
    /// that selects nothing or several), as opposed to missing files or failed downloads.
    pub fn is_argument_error(&self) -> bool {
        matches!(
            self,
            ResolveError::Argument(_) | ResolveError::GgufChoice { .. }
        )
    }
}

/// Resolves the model to serve (see the module docs for the order).
pub async fn resolve_model(request: &ResolveRequest) -> Result<ResolvedModel, ResolveError> {
    let Some(model) = request.model.as_deref() else {
        if let Some(file) = &request.gguf_file {
            return Err(ResolveError::Argument(format!(
                "--gguf-file {file} needs --model owner/repo, the hub repository holding it"
            )));
        }
        let dir = EmbeddedModel::default_model().materialize_in(&request.embedded_bases)?;
        let files = check_model_dir(&dir).map_err(|source| ResolveError::LocalDir {
            model: dir.display().to_string(),
            source,
        })?;
        tracing::info!(dir = %dir.display(), "no --model given: serving the embedded {EMBEDDED_MODEL_ID}");
        return Ok(ResolvedModel {
            model_id: EMBEDDED_MODEL_ID.to_string(),
            files,
            source: ModelSource::Embedded,
        });
    };
    let path = Path::new(model);
    let gguf_error = |reason: String| ResolveError::Gguf {
        model: model.to_string(),
        reason,
    };
    if let Some(file) = find_gguf(path).map_err(|e| gguf_error(e.to_string()))? {
        refuse_gguf_file_for_local(request, model)?;
        let dir = gguf_view(&file, &request.gguf_bases).map_err(gguf_error)?;
        let files = check_model_dir(&dir).map_err(|source| ResolveError::LocalDir {
            model: model.to_string(),
            source,
        })?;
        tracing::info!(file = %file.display(), view = %dir.display(), "serving a GGUF file");
        return Ok(ResolvedModel {
            model_id: model.to_string(),
            files,
            source: ModelSource::LocalGguf,
        });
    }
    if path.exists() || looks_like_path(model) {
        refuse_gguf_file_for_local(request, model)?;
        if request.revision.is_some() {
            tracing::warn!(model, "--revision is ignored for a local directory");
        }
        let files = check_model_dir(path).map_err(|source| ResolveError::LocalDir {
            model: model.to_string(),
            source,
        })?;
        return Ok(ResolvedModel {
            model_id: model.to_string(),
            files,
            source: ModelSource::LocalDir,
        });
    }
    let (repo_id, tag) = split_tag(model);
    if !is_valid_repo_id(repo_id) {
        return Err(ResolveError::NotFound(model.to_string()));
    }
    let selector = selector(request, repo_id, tag)?;
    let revision = request.revision.as_deref().unwrap_or(DEFAULT_REVISION);
    let cache_dir = request
        .hub
        .cache_dir
        .as_deref()
        .ok_or(ResolveError::NoCacheDir)?;
    let hub_gguf = |model_id: String| HubGguf {
        request,
        repo_id,
        revision,
        cache_dir,
        model_id,
    };
    if let Some(selector) = selector {
        let model_id = match &selector {
            Selector::File(name) => format!("{repo_id}:{name}"),
            _ => model.to_string(),
        };
        return hub_gguf(model_id).resolve(&selector).await;
    }
    let detail = match lookup_cache(cache_dir, model, revision) {
        CacheLookup::Hit(files) => {
            tracing::info!(model, revision, dir = %files.dir.display(), "found in the Hugging Face cache");
            return Ok(ResolvedModel {
                model_id: model.to_string(),
                files,
                source: ModelSource::HubCache,
            });
        }
        CacheLookup::Miss => "no snapshot for this revision".to_string(),
        CacheLookup::Incomplete(err) => err.to_string(),
    };
    let gguf_only = hub_gguf(model.to_string());
    if request.hub.offline {
        // A GGUF repository of which one file is cached (the snapshot has no config.json).
        if let Some(model) = gguf_only.cached_only()? {
            return Ok(model);
        }
        return Err(ResolveError::Offline {
            repo_id: model.to_string(),
            revision: revision.to_string(),
            cache_dir: cache_dir.to_path_buf(),
            detail,
        });
    }
    tracing::info!(model, revision, cache = %cache_dir.display(), %detail, "not in the cache: downloading");
    let download_error = |source| ResolveError::Download {
        repo_id: model.to_string(),
        source: Box::new(source),
    };
    let listing = list_repo(&request.hub, cache_dir, model, revision)
        .await
        .map_err(download_error)?;
    if !listing.contains(CONFIG_FILE) && listing.files.iter().any(|f| gguf_pick::is_gguf_name(f)) {
        // A GGUF repository: its only model file, or an error listing them all.
        return gguf_only.resolve_listed(&Selector::Only, &listing).await;
    }
    let files = download_listed(
        &request.hub,
        cache_dir,
        model,
        revision,
        &MODEL_LAYOUT,
        &listing,
    )
    .await
    .map_err(download_error)?;
    let files =
        ModelFiles::from_repo(files).map_err(|e| download_error(DownloadError::Layout(e)))?;
    Ok(ResolvedModel {
        model_id: model.to_string(),
        files,
        source: ModelSource::HubDownload,
    })
}

/// The view directory of the GGUF file `file` (see [`medley_hub::gguf`]): `config.json`,
/// tokenizer files and a `model.gguf` link, under the first usable base, named by a hash of the
/// file's absolute path, size and modification time (a replaced file gets a fresh view).
fn gguf_view(file: &Path, bases: &[PathBuf]) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let target = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let stat = std::fs::metadata(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    let mtime = stat
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut hasher = Sha256::new();
    hasher.update(target.as_os_str().as_encoded_bytes());
    hasher.update(stat.len().to_le_bytes());
    hasher.update(mtime.to_le_bytes());
    let name = format!("view-{}", hex::encode(&hasher.finalize()[..8]));
    let meta = GgufMetadata::read(&target).map_err(|e| e.to_string())?;
    if let Some(parts) = split_count(&meta).filter(|&n| n > 1) {
        return Err(format!(
            "{} is one of {parts} parts of a split GGUF file (`split.count`), which Medley's GGUF \
             loader cannot read: merge the parts with `llama-gguf-split --merge` and serve the \
             merged file",
            file.display()
        ));
    }
    let files = meta.view_files().map_err(|e| e.to_string())?;
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let links = [(GGUF_FILE, target.as_path())];
    StagedContents {
        files: &files,
        links: &links,
    }
    .install_in(bases, &name)
    .map_err(|attempts| {
        format!(
            "cannot write the model view of the GGUF file to any of: {}",
            attempts.join("; ")
        )
    })
}

/// Arguments that can only be meant as paths (so a missing one is reported as a missing
/// directory, not looked up on the hub).
fn looks_like_path(model: &str) -> bool {
    model.starts_with(['/', '.', '~'])
}

/// `split.count` of a GGUF file written by llama.cpp's `gguf-split` (absent in whole files;
/// llama.cpp writes a u16, any integer type is accepted).
fn split_count(meta: &GgufMetadata) -> Option<u64> {
    let v = meta.metadata().get("split.count")?;
    v.to_u16()
        .map(u64::from)
        .or_else(|_| v.to_u8().map(u64::from))
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_u64())
        .ok()
        .or_else(|| {
            let signed = v.to_i32().map(i64::from).or_else(|_| v.to_i64()).ok()?;
            u64::try_from(signed).ok()
        })
}

/// `--gguf-file` selects a file of a hub repository: with a local `--model` it is an error.
fn refuse_gguf_file_for_local(request: &ResolveRequest, model: &str) -> Result<(), ResolveError> {
    match &request.gguf_file {
        Some(file) => Err(ResolveError::Argument(format!(
            "--gguf-file {file} selects a file of a hub repository, but --model {model} is a \
             local path: pass the .gguf file itself as --model"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::hub::testing::{SHA, fake_cache};
    use crate::model_dir::testing::{copy_fixture, fixture_dir, write_sharded};

    fn request(model: Option<&str>, cache: &Path, offline: bool) -> ResolveRequest {
        ResolveRequest {
            model: model.map(str::to_string),
            revision: None,
            gguf_file: None,
            hub: HubSettings {
                cache_dir: Some(cache.to_path_buf()),
                offline,
                endpoint: "http://127.0.0.1:1".into(),
                token: None,
                request_timeout: Duration::from_secs(10),
            },
            embedded_bases: vec![cache.join("embedded")],
            gguf_bases: vec![cache.join("gguf")],
        }
    }

    #[tokio::test]
    async fn local_directory() {
        let tmp = tempfile::tempdir().expect("tmp");
        let fixture = fixture_dir();
        let arg = fixture.to_str().expect("utf8 path");
        let model = resolve_model(&request(Some(arg), tmp.path(), true))
            .await
            .expect("local dir");
        assert_eq!(model.source, ModelSource::LocalDir);
        assert_eq!(model.model_id, arg);
        assert_eq!(model.files.dir, fixture);
    }

    #[tokio::test]
    async fn local_gguf_file_is_served_through_a_view() {
        let tmp = tempfile::tempdir().expect("tmp");
        let models = tmp.path().join("models");
        std::fs::create_dir(&models).expect("mkdir");
        let file = models.join("tiny.Q8_0.gguf");
        medley_shard::fixture::write_gguf(
            &fixture_dir(),
            &file,
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .expect("gguf");
        let arg = file.to_str().expect("utf8");
        let model = resolve_model(&request(Some(arg), tmp.path(), true))
            .await
            .expect("gguf file");
        assert_eq!(model.source, ModelSource::LocalGguf);
        assert_eq!(model.model_id, arg);
        assert!(model.files.dir.starts_with(tmp.path().join("gguf")));
        assert_eq!(
            model.files.weights,
            crate::model_dir::Weights::Gguf(model.files.dir.join("model.gguf"))
        );
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&model.files.config).expect("config"))
                .expect("json");
        assert_eq!(config["num_hidden_layers"], 2);
        tokenizers_load(&model.files.tokenizer);
        // The directory holding the file resolves to the same view, reused.
        let again = resolve_model(&request(models.to_str(), tmp.path(), true))
            .await
            .expect("gguf dir");
        assert_eq!(again.files.dir, model.files.dir);
        // A file that is not GGUF is refused by name.
        let bad = tmp.path().join("bad.gguf");
        std::fs::write(&bad, b"nope").expect("write");
        let err = resolve_model(&request(bad.to_str(), tmp.path(), true))
            .await
            .expect_err("bad gguf");
        assert!(matches!(err, ResolveError::Gguf { .. }), "{err:?}");
        assert!(
            err.to_string().contains("not a readable GGUF file"),
            "{err}"
        );
    }

    fn tokenizers_load(path: &Path) {
        let text = std::fs::read_to_string(path).expect("tokenizer");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["model"]["type"], "BPE");
    }

    #[tokio::test]
    async fn local_directory_missing_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("model");
        copy_fixture(&dir);
        std::fs::remove_file(dir.join("config.json")).expect("rm");
        let arg = dir.to_str().expect("utf8");
        let err = resolve_model(&request(Some(arg), tmp.path(), false))
            .await
            .expect_err("incomplete");
        assert!(matches!(err, ResolveError::LocalDir { .. }), "{err:?}");
        assert!(err.to_string().contains("config.json"), "{err}");
        // A path that does not exist is not sent to the hub.
        let err = resolve_model(&request(Some("./no/such/dir"), tmp.path(), false))
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = resolve_model(&request(Some("a/b/c"), tmp.path(), false))
            .await
            .expect_err("bad id");
        assert!(matches!(err, ResolveError::NotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn hub_id_from_cache_even_offline() {
        let tmp = tempfile::tempdir().expect("tmp");
        let snapshot = fake_cache(tmp.path(), "org/name", "main", copy_fixture);
        let model = resolve_model(&request(Some("org/name"), tmp.path(), true))
            .await
            .expect("cache hit");
        assert_eq!(model.source, ModelSource::HubCache);
        assert_eq!(model.model_id, "org/name");
        assert_eq!(model.files.dir, snapshot);
        assert!(snapshot.ends_with(SHA));
        let mut pinned = request(Some("org/name"), tmp.path(), true);
        pinned.revision = Some(SHA.into());
        assert_eq!(
            resolve_model(&pinned).await.expect("by sha").files.dir,
            snapshot
        );
    }

    #[tokio::test]
    async fn offline_miss_and_incomplete_are_explained() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = resolve_model(&request(Some("org/name"), tmp.path(), true))
            .await
            .expect_err("not cached");
        let msg = err.to_string();
        assert!(matches!(err, ResolveError::Offline { .. }), "{err:?}");
        assert!(msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        let shards = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        fake_cache(tmp.path(), "org/name", "main", |dir| {
            write_sharded(dir, &shards, &shards[..1])
        });
        let msg = resolve_model(&request(Some("org/name"), tmp.path(), true))
            .await
            .expect_err("missing shard")
            .to_string();
        assert!(
            msg.contains(shards[1]) && msg.contains("HF_HUB_OFFLINE=1"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn online_miss_reports_the_unreachable_endpoint() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = resolve_model(&request(Some("org/name"), tmp.path(), false))
            .await
            .expect_err("no hub here");
        assert!(matches!(err, ResolveError::Download { .. }), "{err:?}");
        assert!(err.to_string().contains("http://127.0.0.1:1"), "{err}");
    }

    #[tokio::test]
    async fn no_cache_dir() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut req = request(Some("org/name"), tmp.path(), false);
        req.hub.cache_dir = None;
        assert!(matches!(
            resolve_model(&req).await,
            Err(ResolveError::NoCacheDir)
        ));
    }

    #[tokio::test]
    async fn embedded_default() {
        let tmp = tempfile::tempdir().expect("tmp");
        let model = resolve_model(&request(None, tmp.path(), true))
            .await
            .expect("embedded");
        assert_eq!(model.source, ModelSource::Embedded);
        assert_eq!(model.model_id, EMBEDDED_MODEL_ID);
        assert!(model.files.dir.starts_with(tmp.path().join("embedded")));
    }
}
