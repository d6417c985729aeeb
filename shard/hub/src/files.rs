//! Single files of a hub repository: the cached snapshot of a revision and the files it holds,
//! and downloading one file alone (e.g. one GGUF quantization out of a repository of many).

use std::path::{Component, Path, PathBuf};

use hf_hub::{Repo, RepoType};

use super::{Ctx, DownloadError, HubSettings, fetch, open_repo};

/// How deep [`snapshot_files`] looks into subdirectories of a snapshot.
const MAX_DEPTH: usize = 8;

/// The snapshot directory of `repo_id` at `revision` in the cache at `cache_dir`, if there is
/// one (read-only). `revision` is resolved through `refs/{revision}`; a full commit sha also
/// matches `snapshots/{sha}` directly (as `huggingface_hub` does).
pub fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache_dir.join(repo.folder_name());
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(sha) => sha.trim().to_string(),
        Err(_) if is_commit_sha(revision) => revision.to_string(),
        Err(_) => return None,
    };
    if !is_commit_sha(&commit) {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    snapshot.is_dir().then_some(snapshot)
}

/// The cached copy of the file `name` (relative to the repository root) of `repo_id` at
/// `revision`: `snapshots/{sha}/{name}` when it is there and readable as a file. `None` also
/// for a name that is absolute or climbs out of the snapshot.
pub fn cached_file(cache_dir: &Path, repo_id: &str, revision: &str, name: &str) -> Option<PathBuf> {
    if !is_plain_relative(name) {
        return None;
    }
    let path = cached_snapshot(cache_dir, repo_id, revision)?.join(name);
    path.is_file().then_some(path)
}

/// The files (and links to files) under `snapshot`, as repository file names (`/`-separated,
/// relative to the snapshot), sorted. Unreadable entries and links to nothing are left out.
pub fn snapshot_files(snapshot: &Path) -> Vec<String> {
    let mut names = Vec::new();
    collect(snapshot, "", 0, &mut names);
    names.sort();
    names
}

fn collect(dir: &Path, prefix: &str, depth: usize, names: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        let full = format!("{prefix}{name}");
        if path.is_file() {
            names.push(full);
        } else if path.is_dir() && depth < MAX_DEPTH {
            collect(&path, &format!("{full}/"), depth + 1, names);
        }
    }
}

/// Downloads the file `name` of `repo_id` at `revision` into the cache at `cache_dir` (and
/// nothing else) and returns its snapshot path. The caller checks the cache first
/// ([`cached_file`]): this always asks the hub.
pub async fn download_file(
    settings: &HubSettings,
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
    name: &str,
) -> Result<PathBuf, DownloadError> {
    let ctx = Ctx {
        endpoint: &settings.endpoint,
        repo_id,
        revision,
    };
    if !is_plain_relative(name) {
        return Err(ctx.missing(&format!("file {name:?} (not a relative file name)")));
    }
    let repo = open_repo(settings, cache_dir, &ctx)?;
    fetch(&repo, &ctx, name).await
}

/// A 40-hex-digit git commit id (what the cache names snapshots after).
fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A non-empty relative path made of plain components only (no `..`, `.`, root or prefix).
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{SHA, fake_cache};

    #[test]
    fn cached_files_of_a_snapshot() {
        let tmp = tempfile::tempdir().expect("tmp");
        let snapshot = fake_cache(tmp.path(), "org/name", "main", |dir| {
            std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
            std::fs::write(dir.join("a.gguf"), b"a").expect("write");
            std::fs::write(dir.join("sub/b.gguf"), b"b").expect("write");
        });
        assert_eq!(
            cached_snapshot(tmp.path(), "org/name", "main"),
            Some(snapshot.clone())
        );
        assert_eq!(
            cached_snapshot(tmp.path(), "org/name", SHA),
            Some(snapshot.clone())
        );
        assert_eq!(cached_snapshot(tmp.path(), "org/name", "v2"), None);
        assert_eq!(snapshot_files(&snapshot), vec!["a.gguf", "sub/b.gguf"]);
        assert_eq!(
            cached_file(tmp.path(), "org/name", "main", "sub/b.gguf"),
            Some(snapshot.join("sub/b.gguf"))
        );
        assert_eq!(cached_file(tmp.path(), "org/name", "main", "c.gguf"), None);
        assert_eq!(cached_file(tmp.path(), "org/name", "main", "sub"), None);
        for bad in ["", "../x", "/etc/passwd", "sub/../a.gguf", "./a.gguf"] {
            assert_eq!(
                cached_file(tmp.path(), "org/name", "main", bad),
                None,
                "{bad}"
            );
        }
    }
}
