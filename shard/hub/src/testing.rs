//! Helpers for tests of hub-cache consumers (here and in the router): a fake cache layout.

use std::path::{Path, PathBuf};

/// The commit id `fake_cache` names its snapshot after.
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Builds `models--org--name/snapshots/{SHA}/` (filled by `fill`) + `refs/{revision}` under
/// `cache`; returns the snapshot dir.
pub fn fake_cache(
    cache: &Path,
    repo_id: &str,
    revision: &str,
    fill: impl FnOnce(&Path),
) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(SHA);
    fill(&snapshot);
    let ref_path = repo_dir.join("refs").join(revision);
    std::fs::create_dir_all(ref_path.parent().expect("parent")).expect("mkdir refs");
    std::fs::write(ref_path, format!("{SHA}\n")).expect("ref");
    snapshot
}
