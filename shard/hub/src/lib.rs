//! Hugging Face hub repositories: the settings (from the `HF_*` environment), the local cache
//! layout (`models--{org}--{name}/refs/{revision}` → `snapshots/{sha}/`) and downloads with
//! `hf-hub`. Every function works on a [`RepoLayout`] (the files a kind of repository holds);
//! [`lookup_cache`] and [`download`] are the model ([`MODEL_LAYOUT`]) versions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

mod files;
pub mod gguf;
pub mod model_dir;

pub use files::{cached_file, cached_snapshot, download_file, snapshot_files};

use model_dir::{
    MODEL_LAYOUT, ModelDirError, ModelFiles, RepoFiles, RepoLayout, check_repo_dir,
    index_shard_names,
};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch used when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

/// How to reach the hub and where its cache is. `Debug` never shows the token.
#[derive(Clone)]
pub struct HubSettings {
    /// The cache directory (`.../hub`), if one could be determined.
    pub cache_dir: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` is set: never touch the network.
    pub offline: bool,
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`); else the token file of the cache.
    pub token: Option<String>,
    /// Limit on listing the repository, the first request: an unreachable endpoint fails
    /// within it instead of hanging.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl HubSettings {
    /// Reads the settings from the process environment; `cache_override` is
    /// `--huggingface-hub-cache`.
    pub fn from_env(cache_override: Option<PathBuf>) -> Self {
        Self::from_vars(cache_override, |name| {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        })
    }

    /// Like [`HubSettings::from_env`] with a custom variable lookup (for tests).
    pub fn from_vars(
        cache_override: Option<PathBuf>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let cache_dir = cache_override
            .or_else(|| var("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| var("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface/hub")));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN"));
        Self {
            cache_dir,
            offline,
            endpoint,
            token,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// `huggingface_hub`'s notion of a true environment flag.
fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// True when `id` is a valid hub repository id (`name` or `org/name`), following
/// `huggingface_hub.utils.validate_repo_id`.
pub fn is_valid_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let mut parts = id.split('/');
    let ok_parts = match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, None) => part_ok(name),
        (Some(org), Some(name), None) => part_ok(org) && part_ok(name),
        _ => false,
    };
    ok_parts && id.len() <= 96 && !id.contains("--") && !id.contains("..")
}

/// What the cache holds for one repository revision.
#[derive(Debug)]
pub enum CacheLookup<F = ModelFiles> {
    /// A complete snapshot.
    Hit(F),
    /// Nothing for this revision.
    Miss,
    /// A snapshot exists but lacks files (an interrupted download, or a repo without them).
    Incomplete(ModelDirError),
}

/// Looks the model `repo_id` at `revision` up in the cache at `cache_dir` (read-only); see
/// [`lookup_repo`].
pub fn lookup_cache(cache_dir: &Path, repo_id: &str, revision: &str) -> CacheLookup {
    match lookup_repo(cache_dir, repo_id, revision, &MODEL_LAYOUT) {
        CacheLookup::Hit(files) => match ModelFiles::from_repo(files) {
            Ok(files) => CacheLookup::Hit(files),
            Err(err) => CacheLookup::Incomplete(err),
        },
        CacheLookup::Miss => CacheLookup::Miss,
        CacheLookup::Incomplete(err) => CacheLookup::Incomplete(err),
    }
}

/// Looks `repo_id` at `revision` up in the cache at `cache_dir` (read-only) and checks the
/// snapshot against `layout`.
///
/// `revision` is resolved through `refs/{revision}`; a full commit sha also matches
/// `snapshots/{sha}` directly (as `huggingface_hub` does).
pub fn lookup_repo(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    layout: &RepoLayout,
) -> CacheLookup<RepoFiles> {
    let Some(snapshot) = cached_snapshot(cache_dir, repo_id, revision) else {
        return CacheLookup::Miss;
    };
    match check_repo_dir(&snapshot, layout) {
        Ok(files) => CacheLookup::Hit(files),
        Err(err) => CacheLookup::Incomplete(err),
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The endpoint did not answer within the request timeout.
    #[error("no answer from {endpoint} within {}s while listing {repo_id}@{revision}", timeout.as_secs())]
    Timeout {
        /// The hub endpoint.
        endpoint: String,
        /// The repository.
        repo_id: String,
        /// The revision.
        revision: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// A request to the hub failed.
    #[error("{what} {repo_id}@{revision} from {endpoint} failed: {detail}")]
    Api {
        /// The HTTP status the hub answered with, if it answered.
        status: Option<u16>,
        /// What was being done ("listing", "downloading config.json of").
        what: String,
        /// The hub endpoint.
        endpoint: String,
        /// The repository.
        repo_id: String,
        /// The revision.
        revision: String,
        /// The error with its causes.
        detail: String,
    },
    /// The repository lacks files its layout needs.
    #[error("{repo_id}@{revision} on {endpoint} has no {missing}")]
    MissingInRepo {
        /// The hub endpoint.
        endpoint: String,
        /// The repository.
        repo_id: String,
        /// The revision.
        revision: String,
        /// What it lacks.
        missing: String,
    },
    /// The files landed in different snapshots (the branch moved during the download).
    #[error("{repo_id}@{revision} changed during the download; start again")]
    RevisionMoved {
        /// The repository.
        repo_id: String,
        /// The revision.
        revision: String,
    },
    /// The downloaded snapshot is not a usable model directory.
    #[error(transparent)]
    Layout(#[from] ModelDirError),
}

impl DownloadError {
    /// True when the hub says the repository or revision does not exist or is not accessible
    /// with the token (401, 403, 404: the hub answers 401 for unknown repositories without a
    /// token), or the repository lacks the files of its layout.
    pub fn is_not_found(&self) -> bool {
        match self {
            DownloadError::Api { status, .. } => matches!(status, Some(401 | 403 | 404)),
            DownloadError::MissingInRepo { .. } => true,
            _ => false,
        }
    }
}

/// Downloads the model `repo_id` at `revision` into the cache at `cache_dir` and returns the
/// snapshot; see [`download_repo`].
///
/// Fetches `config.json`, `tokenizer.json`, the optional files the repository has
/// (`tokenizer_config.json`, `generation_config.json`), and `model.safetensors` or the index
/// plus every shard it names. Files already in the cache blob store are not fetched again.
pub async fn download(
    settings: &HubSettings,
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
) -> Result<ModelFiles, DownloadError> {
    let files = download_repo(settings, cache_dir, repo_id, revision, &MODEL_LAYOUT).await?;
    Ok(ModelFiles::from_repo(files)?)
}

/// The files of one repository revision, as the hub lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoListing {
    /// The commit the revision points to.
    pub sha: String,
    /// Every file name (relative to the repository root; may contain `/`), as listed.
    pub files: Vec<String>,
}

impl RepoListing {
    /// Whether the repository holds the file `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.files.iter().any(|f| f == name)
    }
}

/// Lists the files of `repo_id` at `revision` (one request, bounded by
/// [`HubSettings::request_timeout`]).
pub async fn list_repo(
    settings: &HubSettings,
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
) -> Result<RepoListing, DownloadError> {
    let ctx = Ctx {
        endpoint: &settings.endpoint,
        repo_id,
        revision,
    };
    let repo = open_repo(settings, cache_dir, &ctx)?;
    tracing::info!(repo_id, revision, endpoint = %settings.endpoint, "listing the repository");
    let info = tokio::time::timeout(settings.request_timeout, repo.info())
        .await
        .map_err(|_| DownloadError::Timeout {
            endpoint: settings.endpoint.clone(),
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            timeout: settings.request_timeout,
        })?
        .map_err(|e| ctx.api("listing", &e))?;
    Ok(RepoListing {
        sha: info.sha,
        files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
    })
}

/// Downloads the files `layout` names from `repo_id` at `revision` into the cache at
/// `cache_dir` and returns the snapshot: every required file, the optional files the repository
/// has, and the single-file or sharded weights of layouts that have them.
pub async fn download_repo(
    settings: &HubSettings,
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    layout: &RepoLayout,
) -> Result<RepoFiles, DownloadError> {
    let listing = list_repo(settings, cache_dir, repo_id, revision).await?;
    download_listed(settings, cache_dir, repo_id, revision, layout, &listing).await
}

/// [`download_repo`] with the repository already listed (`listing`, from [`list_repo`]).
pub async fn download_listed(
    settings: &HubSettings,
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    layout: &RepoLayout,
    listing: &RepoListing,
) -> Result<RepoFiles, DownloadError> {
    let ctx = Ctx {
        endpoint: &settings.endpoint,
        repo_id,
        revision,
    };
    let repo = open_repo(settings, cache_dir, &ctx)?;
    tracing::info!(
        repo_id,
        revision,
        kind = layout.kind,
        "downloading the repository"
    );
    let available: BTreeSet<&str> = listing.files.iter().map(String::as_str).collect();
    if let Some(required) = layout.required.iter().find(|f| !available.contains(*f)) {
        return Err(ctx.missing(required));
    }
    let mut fetched = Vec::new();
    for name in layout
        .required
        .iter()
        .chain(layout.optional.iter().filter(|f| available.contains(*f)))
    {
        fetched.push(fetch(&repo, &ctx, name).await?);
    }
    if let Some(rule) = layout.weights {
        if available.contains(rule.single) {
            fetched.push(fetch(&repo, &ctx, rule.single).await?);
        } else if available.contains(rule.index) {
            let index = fetch(&repo, &ctx, rule.index).await?;
            for shard in index_shard_names(&index)? {
                fetched.push(fetch(&repo, &ctx, &shard).await?);
            }
            fetched.push(index);
        } else {
            return Err(ctx.missing(&format!("{} or {}", rule.single, rule.index)));
        }
    }
    // Every file sits at snapshots/<sha>/<name>; all must share one snapshot.
    let snapshots: BTreeSet<PathBuf> = fetched
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    let mut snapshots = snapshots.into_iter();
    match (snapshots.next(), snapshots.next()) {
        (Some(dir), None) => Ok(check_repo_dir(&dir, layout)?),
        _ => Err(DownloadError::RevisionMoved {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        }),
    }
}

/// The `hf-hub` handle of `ctx`'s repository revision, caching into `cache_dir`.
fn open_repo(
    settings: &HubSettings,
    cache_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<ApiRepo, DownloadError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf()))
        .with_endpoint(settings.endpoint.clone())
        .with_progress(false);
    if settings.token.is_some() {
        builder = builder.with_token(settings.token.clone());
    }
    let api = builder.build().map_err(|e| ctx.api("setting up", &e))?;
    Ok(api.repo(Repo::with_revision(
        ctx.repo_id.to_string(),
        RepoType::Model,
        ctx.revision.to_string(),
    )))
}

/// What every download error names.
struct Ctx<'a> {
    endpoint: &'a str,
    repo_id: &'a str,
    revision: &'a str,
}

impl Ctx<'_> {
    fn api(&self, what: &str, err: &ApiError) -> DownloadError {
        let status = match err {
            ApiError::RequestError(e) => e.status().map(|s| s.as_u16()),
            _ => None,
        };
        DownloadError::Api {
            status,
            what: what.to_string(),
            endpoint: self.endpoint.to_string(),
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            detail: error_chain(err),
        }
    }

    fn missing(&self, what: &str) -> DownloadError {
        DownloadError::MissingInRepo {
            endpoint: self.endpoint.to_string(),
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            missing: what.to_string(),
        }
    }
}

/// Downloads one file (or finds its blob) and returns its snapshot path.
async fn fetch(repo: &ApiRepo, ctx: &Ctx<'_>, name: &str) -> Result<PathBuf, DownloadError> {
    tracing::info!(repo_id = ctx.repo_id, file = name, "downloading");
    let path = repo
        .download(name)
        .await
        .map_err(|e| ctx.api(&format!("downloading {name} of"), &e))?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    tracing::info!(repo_id = ctx.repo_id, file = name, bytes, "downloaded");
    Ok(path)
}

/// `err: cause: cause...` (reqwest hides the interesting part, e.g. "Connection refused", in
/// its sources).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
