//! Directories of derived files under a cache base, written once and shared by concurrent
//! launchers: the embedded model and the views of GGUF files.
//!
//! `<base>/<name>/` is built in a private temporary directory in `base` and renamed into place in
//! one step. An existing directory is reused when it verifies (every file with the expected bytes,
//! every link to the expected target); a damaged one is moved aside and replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Candidate base directories for derived files of `kind` (`embedded`, `gguf`):
/// `$XDG_CACHE_HOME/medley/<kind>`, `~/.cache/medley/<kind>`, then `<temp dir>/medley/<kind>`.
pub fn cache_bases(kind: &str) -> Vec<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let mut bases = Vec::new();
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        bases.push(PathBuf::from(xdg).join("medley").join(kind));
    }
    if let Some(home) = var("HOME") {
        bases.push(PathBuf::from(home).join(".cache/medley").join(kind));
    }
    bases.push(std::env::temp_dir().join("medley").join(kind));
    bases
}

/// The contents of a staged directory.
#[derive(Debug, Clone, Copy)]
pub struct StagedContents<'a> {
    /// Files (name, bytes).
    pub files: &'a [(&'a str, &'a [u8])],
    /// Symbolic links (name, absolute target).
    pub links: &'a [(&'a str, &'a Path)],
}

/// Rounds of verify / move aside / rename before a contended install gives up.
const INSTALL_ATTEMPTS: usize = 8;

impl StagedContents<'_> {
    /// Returns `<base>/<name>/` holding exactly these contents, writing it if needed.
    pub fn install(&self, base: &Path, name: &str) -> std::io::Result<PathBuf> {
        let target = base.join(name);
        if self.verify(&target) {
            return Ok(target);
        }
        std::fs::create_dir_all(base)?;
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(base)?;
        for (name, bytes) in self.files {
            let path = staging.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut file = std::fs::File::create(path)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        for (name, to) in self.links {
            std::os::unix::fs::symlink(to, staging.path().join(name))?;
        }
        let staging = staging.keep();
        // Other launchers may be installing the same content at the same time: a target that
        // verifies (theirs, identical) wins; otherwise a damaged one is moved aside and ours is
        // put in its place, again if another launcher swapped in between.
        let mut last = None;
        for _ in 0..INSTALL_ATTEMPTS {
            if self.verify(&target) {
                let _ = std::fs::remove_dir_all(&staging);
                return Ok(target);
            }
            if target.exists() {
                match tempfile::Builder::new().prefix(".trash-").tempdir_in(base) {
                    Ok(trash) => {
                        let _ = std::fs::rename(&target, trash.path().join("old"));
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&staging);
                        return Err(e);
                    }
                }
            }
            match std::fs::rename(&staging, &target) {
                Ok(()) => return Ok(target),
                Err(e) => last = Some(e),
            }
        }
        let _ = std::fs::remove_dir_all(&staging);
        Err(last.unwrap_or_else(|| std::io::Error::other("installation raced too often")))
    }

    /// Installs under the first of `bases` where that works; `Err` lists every attempt.
    pub fn install_in(&self, bases: &[PathBuf], name: &str) -> Result<PathBuf, Vec<String>> {
        let mut attempts = Vec::new();
        for base in bases {
            match self.install(base, name) {
                Ok(dir) => return Ok(dir),
                Err(e) => {
                    tracing::debug!(base = %base.display(), error = %e, "cannot install here");
                    attempts.push(format!("{}: {e}", base.display()));
                }
            }
        }
        Err(attempts)
    }

    /// True when `dir` holds every file with the expected bytes and every link.
    pub fn verify(&self, dir: &Path) -> bool {
        self.files.iter().all(|(name, bytes)| {
            std::fs::read(dir.join(name)).is_ok_and(|on_disk| on_disk == *bytes)
        }) && self
            .links
            .iter()
            .all(|(name, to)| std::fs::read_link(dir.join(name)).is_ok_and(|t| t == *to))
    }
}
