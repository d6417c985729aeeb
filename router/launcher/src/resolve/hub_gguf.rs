//! GGUF checkpoints in hub repositories: the one `.gguf` file the flags select (see
//! [`super::gguf_pick`]) is found in the Hugging Face cache or downloaded alone, then served
//! through a model view exactly like a local GGUF file.
//!
//! Cache first: `--gguf-file NAME` that is cached, or a tag that matches one cached file as a
//! whole token, resolves without a request. Otherwise the repository is listed (one request),
//! the file picked among everything it holds, and downloaded unless cached. Offline, only the
//! cache counts.

use std::path::{Path, PathBuf};

use super::gguf_pick::{PickError, Picked, Selector, describe, is_gguf_name, pick, split_part};
use super::{ModelSource, ResolveError, ResolveRequest, ResolvedModel, check_model_dir, gguf_view};
use crate::hub::{
    RepoListing, cached_file, cached_snapshot, download_file, list_repo, snapshot_files,
};
use crate::model_dir::CONFIG_FILE;

/// One hub repository revision to take a GGUF file from.
pub(super) struct HubGguf<'a> {
    /// Hub settings, cache and view locations.
    pub request: &'a ResolveRequest,
    /// The repository (`owner/repo`).
    pub repo_id: &'a str,
    /// The revision.
    pub revision: &'a str,
    /// The Hugging Face cache.
    pub cache_dir: &'a Path,
    /// What clients will be told the model is.
    pub model_id: String,
}

impl HubGguf<'_> {
    /// Resolves the file `selector` names: cache first, then (online) the hub.
    pub async fn resolve(&self, selector: &Selector) -> Result<ResolvedModel, ResolveError> {
        let offline = self.request.hub.offline;
        if let Some(file) = self.cached_pick(selector, offline)? {
            return self.serve(&file, ModelSource::HubCache);
        }
        if offline {
            return Err(self.offline(self.cache_miss_detail(selector)));
        }
        let listing = self.list().await?;
        self.resolve_listed(selector, &listing).await
    }

    /// [`HubGguf::resolve`] after the repository has been listed (`listing`).
    pub async fn resolve_listed(
        &self,
        selector: &Selector,
        listing: &RepoListing,
    ) -> Result<ResolvedModel, ResolveError> {
        let picked = pick(&listing.files, selector, self.repo_id).map_err(|e| self.choice(e))?;
        if let Some(file) = cached_file(self.cache_dir, self.repo_id, self.revision, &picked.name) {
            return self.serve(&file, ModelSource::HubCache);
        }
        tracing::info!(
            repo_id = self.repo_id,
            revision = self.revision,
            file = %picked.name,
            "not in the cache: downloading the GGUF file"
        );
        let file = download_file(
            &self.request.hub,
            self.cache_dir,
            self.repo_id,
            self.revision,
            &picked.name,
        )
        .await
        .map_err(|e| self.download_error(e))?;
        self.serve(&file, ModelSource::HubDownload)
    }

    /// Offline, without a selector: the snapshot's only `.gguf` file when the snapshot is of a
    /// GGUF repository (no `config.json`); an error listing them when it holds several.
    pub fn cached_only(&self) -> Result<Option<ResolvedModel>, ResolveError> {
        let is_gguf_repo = cached_snapshot(self.cache_dir, self.repo_id, self.revision)
            .is_some_and(|dir| !dir.join(CONFIG_FILE).exists());
        if !is_gguf_repo {
            return Ok(None);
        }
        match self.cached_pick(&Selector::Only, true)? {
            Some(file) => self.serve(&file, ModelSource::HubCache).map(Some),
            None => Ok(None),
        }
    }

    /// The cached file `selector` resolves to, when the cache alone can tell. A choice error
    /// among cached files (several match, a split file) is final: the hub holds them too.
    pub fn cached_pick(
        &self,
        selector: &Selector,
        offline: bool,
    ) -> Result<Option<PathBuf>, ResolveError> {
        if let Selector::File(name) = selector {
            return Ok(cached_file(
                self.cache_dir,
                self.repo_id,
                self.revision,
                name,
            ));
        }
        let Some(snapshot) = cached_snapshot(self.cache_dir, self.repo_id, self.revision) else {
            return Ok(None);
        };
        let names = snapshot_files(&snapshot);
        if !names.iter().any(|n| is_gguf_name(n)) {
            return Ok(None);
        }
        match (pick(&names, selector, self.repo_id), selector) {
            // Online, a tag matched only inside a longer token may match more on the hub.
            (Ok(Picked { exact: false, .. }), Selector::Tag(_)) if !offline => Ok(None),
            (Ok(picked), _) => Ok(Some(snapshot.join(&picked.name))),
            (Err(PickError::NoMatch { .. }), _) => Ok(None),
            // Online, the repository may hold the one file the cache lacks.
            (Err(_), Selector::Only) if !offline => Ok(None),
            (Err(e), _) => Err(self.choice(e)),
        }
    }

    /// Lists the repository.
    pub async fn list(&self) -> Result<RepoListing, ResolveError> {
        list_repo(
            &self.request.hub,
            self.cache_dir,
            self.repo_id,
            self.revision,
        )
        .await
        .map_err(|e| self.download_error(e))
    }

    /// The view of the GGUF file `file` (a cache snapshot path), checked.
    fn serve(&self, file: &Path, source: ModelSource) -> Result<ResolvedModel, ResolveError> {
        let dir =
            gguf_view(file, &self.request.gguf_bases).map_err(|reason| ResolveError::Gguf {
                model: self.model_id.clone(),
                reason,
            })?;
        let files = check_model_dir(&dir).map_err(|source| ResolveError::LocalDir {
            model: self.model_id.clone(),
            source,
        })?;
        tracing::info!(
            repo_id = self.repo_id,
            revision = self.revision,
            file = %file.display(),
            view = %dir.display(),
            ?source,
            "serving a GGUF file from the hub"
        );
        Ok(ResolvedModel {
            model_id: self.model_id.clone(),
            files,
            source,
        })
    }

    /// What the cache lacks, for the offline error.
    fn cache_miss_detail(&self, selector: &Selector) -> String {
        let have = match cached_snapshot(self.cache_dir, self.repo_id, self.revision) {
            None => "no snapshot for this revision".to_string(),
            Some(snapshot) => {
                let cached: Vec<String> = snapshot_files(&snapshot)
                    .into_iter()
                    .filter(|n| is_gguf_name(n))
                    .collect();
                if cached.is_empty() {
                    "no .gguf file is cached".to_string()
                } else {
                    format!("cached .gguf files: {}", describe(&cached))
                }
            }
        };
        match selector {
            Selector::File(name) => format!("{name} is not cached; {have}"),
            Selector::Tag(tag) => format!("no cached .gguf file matches the tag `{tag}`; {have}"),
            Selector::Only => have,
        }
    }

    fn offline(&self, detail: String) -> ResolveError {
        ResolveError::Offline {
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            cache_dir: self.cache_dir.to_path_buf(),
            detail,
        }
    }

    fn choice(&self, err: PickError) -> ResolveError {
        ResolveError::GgufChoice {
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            reason: err.to_string(),
        }
    }

    fn download_error(&self, source: crate::hub::DownloadError) -> ResolveError {
        ResolveError::Download {
            repo_id: self.repo_id.to_string(),
            source: Box::new(source),
        }
    }
}

/// `owner/repo:TAG` → (`owner/repo`, `Some("TAG")`); anything else is all repository id.
pub(super) fn split_tag(model: &str) -> (&str, Option<&str>) {
    match model.rsplit_once(':') {
        Some((repo, tag)) => (repo, Some(tag)),
        None => (model, None),
    }
}

/// Which GGUF file of the hub repository `repo_id` the flags select, if any; checks the
/// `--gguf-file` name and the tag before anything is looked up.
pub(super) fn selector(
    request: &ResolveRequest,
    repo_id: &str,
    tag: Option<&str>,
) -> Result<Option<Selector>, ResolveError> {
    let argument = |msg: String| Err(ResolveError::Argument(msg));
    match (tag, request.gguf_file.as_deref()) {
        (Some(tag), Some(file)) => argument(format!(
            "--model {repo_id}:{tag} and --gguf-file {file} both select a GGUF file: give one"
        )),
        (Some(tag), None) => {
            if tag.is_empty() || tag.contains('/') {
                return argument(format!(
                    "--model {repo_id}:{tag}: the part after `:` must be a quantization tag \
                     such as Q4_K_M"
                ));
            }
            Ok(Some(Selector::Tag(tag.to_string())))
        }
        (None, Some(file)) => {
            let plain = Path::new(file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain || !is_gguf_name(file) {
                return argument(format!(
                    "--gguf-file {file}: expected the name of a .gguf file in the repository \
                     (e.g. model.Q4_K_M.gguf)"
                ));
            }
            if let Some(part) = split_part(file) {
                let err = PickError::Split {
                    first: part.first_name(file),
                    parts: part.count,
                };
                return argument(format!("--gguf-file {file}: {err}"));
            }
            Ok(Some(Selector::File(file.to_string())))
        }
        (None, None) => Ok(None),
    }
}
