//! Where adapter files come from: a directory under one of the shard's adapter roots (`LOCAL`),
//! a hub repository from the Hugging Face cache or downloaded into it (`HUB`), or an S3 prefix
//! from the S3 adapter cache or downloaded into it (`S3`, see [`super::s3`]).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use medley_spec::{AdapterRef, AdapterSource};

use super::AdapterError;
use super::config::BuiltinAdapter;
use super::s3::{S3Adapters, S3Settings};
use medley_hub::model_dir::{ModelDirError, RepoLayout, check_repo_dir};
use medley_hub::{
    CacheLookup, DEFAULT_REVISION, HubSettings, download_repo, is_valid_repo_id, lookup_repo,
};

/// A PEFT LoRA adapter repository: `adapter_config.json` + `adapter_model.safetensors`.
pub const ADAPTER_LAYOUT: RepoLayout = RepoLayout {
    kind: "adapter",
    required: &[
        medley_merge::peft::CONFIG_FILE,
        medley_merge::peft::WEIGHTS_FILE,
    ],
    optional: &[],
    weights: None,
};

/// Identity of an adapter's files on disk: the directory and the length and modification time
/// of each file, so an edited local adapter is read again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceKey {
    dir: PathBuf,
    stamps: Vec<(u64, Option<SystemTime>)>,
}

/// A resolved adapter directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSource {
    /// The adapter id as requested (for messages).
    pub id: String,
    /// The directory holding the adapter files.
    pub dir: PathBuf,
    /// The identity of the files (key of the parsed-adapter cache).
    pub key: SourceKey,
}

/// Resolves [`AdapterRef`]s to adapter directories.
#[derive(Debug, Clone)]
pub struct AdapterSources {
    /// Canonical adapter roots, in the configured order.
    roots: Vec<PathBuf>,
    hub: HubSettings,
    s3: Arc<S3Adapters>,
    builtin: Vec<BuiltinAdapter>,
}

impl AdapterSources {
    /// Canonicalizes `roots` (each must be an existing directory); S3 access comes from the
    /// environment ([`S3Settings::from_env`], see [`Self::with_s3`]).
    pub fn new(roots: &[PathBuf], hub: HubSettings) -> Result<Self, AdapterError> {
        let roots = roots
            .iter()
            .map(|r| {
                let canonical = r.canonicalize().map_err(|e| {
                    AdapterError::Invalid(format!("adapter root {}: {e}", r.display()))
                })?;
                if canonical.is_dir() {
                    Ok(canonical)
                } else {
                    Err(AdapterError::Invalid(format!(
                        "adapter root {} is not a directory",
                        r.display()
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            roots,
            hub,
            s3: Arc::new(S3Adapters::new(S3Settings::from_env())),
            builtin: Vec::new(),
        })
    }

    /// The same resolver answering the hub ids of `builtin` from their directories.
    pub fn with_builtin(mut self, builtin: Vec<BuiltinAdapter>) -> Self {
        self.builtin = builtin;
        self
    }

    /// The same resolver with S3 access and cache from `settings`.
    pub fn with_s3(mut self, settings: S3Settings) -> Self {
        self.s3 = Arc::new(S3Adapters::new(settings));
        self
    }

    /// The S3 resolver.
    pub fn s3(&self) -> &S3Adapters {
        &self.s3
    }

    /// The canonical adapter roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Resolves one adapter reference (the hub path may download).
    pub async fn resolve(&self, r: &AdapterRef) -> Result<ResolvedSource, AdapterError> {
        match r.source {
            AdapterSource::Local => self.resolve_local(&r.id),
            AdapterSource::Hub => {
                self.resolve_hub(&r.id, r.revision.as_deref(), r.api_token.as_deref())
                    .await
            }
            AdapterSource::S3 => self.resolve_s3(&r.id).await,
        }
    }

    /// An S3 adapter (`s3://bucket/prefix`): the S3 adapter cache when it holds the version the
    /// server lists, else a download into it.
    pub async fn resolve_s3(&self, id: &str) -> Result<ResolvedSource, AdapterError> {
        let dir = self.s3.resolve(id).await?;
        let files = check_repo_dir(&dir, &ADAPTER_LAYOUT).map_err(|e| layout_error(id, e))?;
        source(id, files.dir)
    }

    /// A local adapter: `id` is a directory path, relative to the first root or absolute inside
    /// one of the roots after resolving symlinks; `..` components are refused.
    pub fn resolve_local(&self, id: &str) -> Result<ResolvedSource, AdapterError> {
        let Some(first) = self.roots.first() else {
            return Err(AdapterError::LocalDisabled { id: id.to_string() });
        };
        let path = Path::new(id);
        if id.trim().is_empty() {
            return Err(AdapterError::Invalid("empty local adapter id".into()));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(AdapterError::Invalid(format!(
                "local adapter id {id} must not contain `..` components"
            )));
        }
        let candidate = if path.is_absolute() {
            path.to_path_buf()
        } else {
            first.join(path)
        };
        let dir = candidate.canonicalize().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AdapterError::NotFound {
                    id: id.to_string(),
                    detail: format!("{} does not exist", candidate.display()),
                }
            } else {
                AdapterError::Invalid(format!("local adapter {id}: {}: {e}", candidate.display()))
            }
        })?;
        self.check_inside_roots(id, &dir)?;
        let files = check_repo_dir(&dir, &ADAPTER_LAYOUT).map_err(|e| layout_error(id, e))?;
        // The files themselves may be symlinks: they must not lead out of the roots either.
        for name in ADAPTER_LAYOUT.required {
            let real =
                files.dir.join(name).canonicalize().map_err(|e| {
                    AdapterError::Internal(format!("local adapter {id}: {name}: {e}"))
                })?;
            self.check_inside_roots(id, &real)?;
        }
        source(id, files.dir)
    }

    fn check_inside_roots(&self, id: &str, real: &Path) -> Result<(), AdapterError> {
        if self.roots.iter().any(|root| real.starts_with(root)) {
            return Ok(());
        }
        let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        Err(AdapterError::Invalid(format!(
            "local adapter {id} resolves to {}, outside the adapter roots ({})",
            real.display(),
            roots.join(", ")
        )))
    }

    /// A hub adapter: the Hugging Face cache first, else a download (with `token`, or the
    /// shard's `HF_TOKEN`) unless `HF_HUB_OFFLINE` is set.
    pub async fn resolve_hub(
        &self,
        id: &str,
        revision: Option<&str>,
        token: Option<&str>,
    ) -> Result<ResolvedSource, AdapterError> {
        if !is_valid_repo_id(id) {
            return Err(AdapterError::Invalid(format!(
                "adapter id {id} is not a hub repository id of the form `org/name` (use source LOCAL for directories)"
            )));
        }
        let revision = revision
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_REVISION);
        if revision == DEFAULT_REVISION
            && let Some(b) = self.builtin.iter().find(|b| b.id == id)
        {
            let files = check_repo_dir(&b.dir, &ADAPTER_LAYOUT).map_err(|e| layout_error(id, e))?;
            tracing::debug!(id, dir = %b.dir.display(), "built-in adapter");
            return source(id, files.dir);
        }
        let Some(cache_dir) = self.hub.cache_dir.as_deref() else {
            return Err(AdapterError::Hub {
                id: id.to_string(),
                detail: "cannot locate the Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into(),
            });
        };
        let detail = match lookup_repo(cache_dir, id, revision, &ADAPTER_LAYOUT) {
            CacheLookup::Hit(files) => {
                tracing::debug!(id, revision, dir = %files.dir.display(), "adapter found in the Hugging Face cache");
                return source(id, files.dir);
            }
            CacheLookup::Miss => "no snapshot for this revision".to_string(),
            CacheLookup::Incomplete(err) => err.to_string(),
        };
        if self.hub.offline {
            return Err(AdapterError::NotFound {
                id: id.to_string(),
                detail: format!(
                    "revision {revision} is not in the Hugging Face cache at {} ({detail}) and HF_HUB_OFFLINE=1",
                    cache_dir.display()
                ),
            });
        }
        let mut settings = self.hub.clone();
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            settings.token = Some(token.to_string());
        }
        tracing::info!(id, revision, %detail, "adapter not in the cache: downloading");
        match download_repo(&settings, cache_dir, id, revision, &ADAPTER_LAYOUT).await {
            Ok(files) => source(id, files.dir),
            Err(e) if e.is_not_found() => Err(AdapterError::NotFound {
                id: id.to_string(),
                detail: e.to_string(),
            }),
            Err(e) => Err(AdapterError::Hub {
                id: id.to_string(),
                detail: e.to_string(),
            }),
        }
    }
}

/// A missing or incomplete adapter directory: the id names no adapter.
fn layout_error(id: &str, e: ModelDirError) -> AdapterError {
    match e {
        ModelDirError::NotADirectory(p) => AdapterError::NotFound {
            id: id.to_string(),
            detail: format!("{} is not a directory", p.display()),
        },
        other => AdapterError::NotFound {
            id: id.to_string(),
            detail: other.to_string(),
        },
    }
}

/// Stamps the files of `dir`.
fn source(id: &str, dir: PathBuf) -> Result<ResolvedSource, AdapterError> {
    let stamps = ADAPTER_LAYOUT
        .required
        .iter()
        .map(|name| {
            let meta = std::fs::metadata(dir.join(name))
                .map_err(|e| AdapterError::Internal(format!("adapter {id}: {name}: {e}")))?;
            Ok((meta.len(), meta.modified().ok()))
        })
        .collect::<Result<Vec<_>, AdapterError>>()?;
    Ok(ResolvedSource {
        id: id.to_string(),
        key: SourceKey {
            dir: dir.clone(),
            stamps,
        },
        dir,
    })
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
