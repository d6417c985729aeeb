//! Adapter settings of a shard (from its command line) and byte-size parsing.

use std::path::PathBuf;
use std::str::FromStr;

use medley_hub::HubSettings;

/// Default adapter memory budget: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;
/// Default number of adapter slots.
pub const DEFAULT_MAX_SLOTS: u32 = 64;

/// Everything the adapter runtime of a shard is configured with.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    /// Directories local adapters may be loaded from (relative ids resolve under the first).
    pub roots: Vec<PathBuf>,
    /// Bytes of adapter weights the slots may hold together.
    pub memory_budget: u64,
    /// Number of slots (slot 0, the base model, excluded).
    pub max_slots: u32,
    /// Bytes of parsed source adapters kept in memory for later merges.
    pub source_cache_bytes: u64,
    /// Threads of the pool merges run on (kept apart from the forward pass's threads).
    pub merge_threads: usize,
    /// Hub access for `HUB` adapters.
    pub hub: HubSettings,
    /// Hub ids answered from local directories, before the cache and the network.
    pub builtin: Vec<BuiltinAdapter>,
}

/// A hub adapter id served from a local directory instead of the hub: the adapters that come
/// with the model `medley serve` embeds (`medley-demo/sql`, ...), available offline by their
/// ids. Written `ID=DIR` on the command line (`--builtin-adapter`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinAdapter {
    /// The hub id it answers to (`owner/name`, no revision).
    pub id: String,
    /// The PEFT adapter directory.
    pub dir: PathBuf,
}

impl FromStr for BuiltinAdapter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("built-in adapter `{s}` is not ID=DIR"))?;
        if id.trim().is_empty() || dir.trim().is_empty() {
            return Err(format!(
                "built-in adapter `{s}` needs both an id and a directory"
            ));
        }
        Ok(Self {
            id: id.trim().to_string(),
            dir: PathBuf::from(dir.trim()),
        })
    }
}

impl AdapterSettings {
    /// Settings with the defaults (no roots, 1 GiB, 64 slots, a source cache as large as the
    /// budget, half the cores for merges) and the given hub access.
    pub fn new(hub: HubSettings) -> Self {
        Self {
            roots: Vec::new(),
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_slots: DEFAULT_MAX_SLOTS,
            source_cache_bytes: DEFAULT_MEMORY_BUDGET,
            merge_threads: default_merge_threads(),
            hub,
            builtin: Vec::new(),
        }
    }
}

/// Half the available cores, at least one.
pub fn default_merge_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

/// Parses a byte count: plain bytes (`1073741824`), or a number with a unit — binary `KiB`,
/// `MiB`, `GiB`, `TiB` (also `K`, `M`, `G`, `T`) or decimal `kB`, `MB`, `GB`, `TB`; `B` alone is
/// bytes. Units are case-insensitive; fractions are allowed with a unit (`1.5GiB`).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (s[..split].trim(), s[split..].trim());
    let bad =
        || format!("invalid byte size `{text}`: use bytes or a unit such as 512MiB, 2GiB, 1.5GB");
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(multiplier).ok_or_else(bad);
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (value * multiplier as f64).floor();
    if unit.is_empty() || !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        for (text, want) in [
            ("1073741824", 1u64 << 30),
            ("0", 0),
            ("512MiB", 512 << 20),
            ("2GiB", 2 << 30),
            ("2 gib", 2 << 30),
            ("1.5GiB", 3 << 29),
            ("10kB", 10_000),
            ("3G", 3 << 30),
            ("7B", 7),
            ("1TB", 1_000_000_000_000),
        ] {
            assert_eq!(parse_byte_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "1.5",
            "-1",
            "12 parsecs",
            "1e9",
            "99999999999999999999GiB",
        ] {
            let err = parse_byte_size(bad).expect_err(bad);
            assert!(err.contains("512MiB"), "{err}");
        }
    }
}
