//! Building the binaries the end-to-end tests start, once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

use crate::workspace_root;

/// Directory holding the binaries of the current profile (next to this test executable).
pub(crate) fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-exe>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("cannot locate the target directory from the test executable")
}

/// Whether `key` is one of the variables cargo sets for the package whose tests run.
fn is_package_var(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
        )
}

/// The features of the binaries [`binaries`] builds: those the workspace's tests enable.
const BIN_FEATURES: &str = "medley-shard/testing,medley-merge/testing";

/// Builds `medley`, `medley-router` and `medley-shard` once per test process (a no-op when up to date) and
/// returns the directory holding them.
///
/// They are built with the features `cargo test --workspace` unifies (the `testing` features of
/// the shard and the merge crate: fixture generators and test hooks a server never calls), so
/// that after the workspace's test build this links at most `medley-router` instead of building
/// the shard and the launcher a second time, and the binaries under test are the ones that
/// build made.
pub fn binaries() -> anyhow::Result<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let dir = bin_dir().map_err(|e| e.to_string())?;
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "-p",
            "medley",
            "-p",
            "medley-router",
            "-p",
            "medley-shard",
            "--bins",
            "--features",
            BIN_FEATURES,
        ]);
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        // Cargo gives this test process the variables of the package under test; build scripts
        // that track one (ring's tracks CARGO_MANIFEST_DIR) would see it changed and rebuild,
        // and everything above them with it, so the binaries would not be the ones the
        // workspace's build made.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(is_package_var) {
                cmd.env_remove(&key);
            }
        }
        let status = cmd
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of the binaries failed: {status}"));
        }
        Ok(dir)
    });
    match built {
        Ok(p) => Ok(p.as_path()),
        Err(e) => bail!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::is_package_var;

    #[test]
    fn only_the_package_variables_are_dropped() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_CRATE_NAME",
        ] {
            assert!(is_package_var(key), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "PATH",
        ] {
            assert!(!is_package_var(key), "{key}");
        }
    }
}
