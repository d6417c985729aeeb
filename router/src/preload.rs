//! Adapters loaded at start-up: `--preload-adapters` (kept as a cache, evictable) and
//! `--pin-adapters` (never evicted). Each entry is an adapter id as a request would give it,
//! optionally prefixed with its source (`local:my-adapter`, `hub:org/name`; an `s3://` id
//! names its source by itself), or the name of a named merge (`--merges`). The router loads
//! them before it starts listening, so a server that answers health has them resident; one that
//! cannot be loaded stops the start-up with its error. They are loaded again when the shards
//! restart.

use medley_spec::{AdapterSelector, AdapterSource};

use crate::backend::adapters::AdminError;
use crate::config::ConfigError;
use crate::infer::Infer;

/// The start-up preload flags (part of [`crate::config::RouterArgs`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PreloadArgs {
    /// Adapters (or named merges) to load at start-up, comma-separated: `[hub:|local:]ID` or
    /// a merge name; they stay cached until evicted like any adapter.
    #[arg(long, env = "PRELOAD_ADAPTERS", value_delimiter = ',')]
    pub preload_adapters: Vec<String>,
    /// Adapters (or named merges) to load at start-up and never evict (at most the adapter
    /// slots less one).
    #[arg(long, env = "PIN_ADAPTERS", value_delimiter = ',')]
    pub pin_adapters: Vec<String>,
}

/// One adapter to load at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreloadEntry {
    /// The adapter id (or merge name).
    pub id: String,
    /// Its source, when the entry names one.
    pub source: Option<String>,
    /// Never evict it.
    pub pinned: bool,
}

impl PreloadEntry {
    /// Parses `[SOURCE:]ID`.
    pub fn parse(entry: &str, pinned: bool) -> Result<Self, ConfigError> {
        let entry = entry.trim();
        let (source, id) = match entry.split_once(':') {
            // An `s3://bucket/prefix` id names its source.
            Some((scheme, rest)) if rest.starts_with("//") => {
                (Some(scheme.to_ascii_lowercase()), entry)
            }
            Some((prefix, rest)) if prefix.parse::<AdapterSource>().is_ok() => {
                (Some(prefix.to_ascii_lowercase()), rest.trim())
            }
            _ => (None, entry),
        };
        if id.is_empty() {
            let flag = if pinned {
                "--pin-adapters"
            } else {
                "--preload-adapters"
            };
            return Err(ConfigError::Invalid(format!(
                "{flag}: `{entry}` names no adapter"
            )));
        }
        Ok(Self {
            id: id.to_string(),
            source,
            pinned,
        })
    }
}

impl PreloadArgs {
    /// The entries, pinned ones first; an adapter named by both flags is pinned.
    pub fn into_entries(self) -> Result<Vec<PreloadEntry>, ConfigError> {
        let pinned = self
            .pin_adapters
            .iter()
            .map(|e| PreloadEntry::parse(e, true));
        let cached = self
            .preload_adapters
            .iter()
            .map(|e| PreloadEntry::parse(e, false));
        let mut entries: Vec<PreloadEntry> = Vec::new();
        for e in pinned.chain(cached) {
            let e = e?;
            if !entries.iter().any(|x| x.id == e.id && x.source == e.source) {
                entries.push(e);
            }
        }
        Ok(entries)
    }
}

/// Loads every entry, in order, waiting for each to be resident.
pub async fn preload_all(infer: &Infer, entries: &[PreloadEntry]) -> Result<(), PreloadError> {
    for e in entries {
        let fail = |source: AdminError| PreloadError {
            id: e.id.clone(),
            source,
        };
        let spec = infer
            .admin_spec(AdapterSelector {
                adapter_id: Some(&e.id),
                adapter_source: e.source.as_deref(),
                ..Default::default()
            })
            .map_err(fail)?;
        let view = infer
            .backend()
            .preload(spec, e.pinned, true)
            .await
            .map_err(fail)?;
        tracing::info!(
            adapter = %e.id, key = %view.key, bytes = view.bytes, slot = view.slot,
            pinned = e.pinned, "adapter preloaded"
        );
    }
    Ok(())
}

/// A start-up preload that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot preload adapter `{id}`: {source}")]
pub struct PreloadError {
    /// The entry's id.
    pub id: String,
    /// Why.
    pub source: AdminError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_with_and_without_source() {
        let e = |s| PreloadEntry::parse(s, false).expect(s);
        assert_eq!(e("org/name").source, None);
        assert_eq!(e("org/name").id, "org/name");
        assert_eq!(e("local:my-adapter").source.as_deref(), Some("local"));
        assert_eq!(e("local:my-adapter").id, "my-adapter");
        assert_eq!(e("HUB:org/x").source.as_deref(), Some("hub"));
        // A colon that is not a source prefix stays in the id (a merge name may hold one).
        assert_eq!(e("team:merge").id, "team:merge");
        assert_eq!(e("team:merge").source, None);
        assert_eq!(e("s3://bucket/a").source.as_deref(), Some("s3"));
        assert_eq!(e("s3://bucket/a").id, "s3://bucket/a");
        assert!(PreloadEntry::parse("local:", true).is_err());
        assert!(PreloadEntry::parse(" ", false).is_err());
    }

    #[test]
    fn pinned_entries_come_first_and_win() {
        let args = PreloadArgs {
            preload_adapters: vec!["a".into(), "local:b".into()],
            pin_adapters: vec!["local:b".into()],
        };
        let entries = args.into_entries().expect("entries");
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0],
            PreloadEntry {
                id: "b".into(),
                source: Some("local".into()),
                pinned: true
            }
        );
        assert!(!entries[1].pinned);
    }
}
