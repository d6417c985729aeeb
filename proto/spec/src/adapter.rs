//! Which weights a request runs with ([`AdapterSpec`]) and its canonical identity
//! ([`AdapterKey`]): the SHA-256 of a stable encoding, so that two requests that would produce the
//! same weights share one adapter slot (and one merge), and nothing else does.
//!
//! The encoding covers, per component, the source, the normalised id and the revision; for a
//! merge, the [`MergeSpec`] canonical bytes (strategy, weights and density as
//! `f32` bits with `-0.0` mapped to `0.0`, lower-case names, the effective seed, the SVD rank, the
//! semantics, fields the strategy ignores reset); and the SHA-256 of the `api_token` when one is
//! given, so that an adapter fetched with a token is never served to a request without it.

use std::fmt;
use std::str::FromStr;

use crate::merge::MergeSpec;
use sha2::{Digest, Sha256};

/// Where an adapter's files come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AdapterSource {
    /// A Hugging Face hub repository id (the shard's cache first, then a download).
    #[default]
    Hub,
    /// A directory under one of the allowed `--adapter-root`s.
    Local,
    /// An S3 (or S3-compatible) "directory", `s3://bucket/prefix`, fetched by the shard with its
    /// `AWS_*` credentials and cached locally.
    S3,
}

impl AdapterSource {
    /// Every source.
    pub const ALL: [AdapterSource; 3] =
        [AdapterSource::Hub, AdapterSource::Local, AdapterSource::S3];

    /// The lower-case wire name (`hub`, `local`, `s3`).
    pub fn name(self) -> &'static str {
        match self {
            AdapterSource::Hub => "hub",
            AdapterSource::Local => "local",
            AdapterSource::S3 => "s3",
        }
    }
}

impl fmt::Display for AdapterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An `adapter_source` that is not `hub`, `local` or `s3`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`adapter_source` must be one of hub, local, s3. Given: {0}")]
pub struct UnknownAdapterSource(pub String);

impl FromStr for AdapterSource {
    type Err = UnknownAdapterSource;

    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|v| v.name() == lower)
            .ok_or_else(|| UnknownAdapterSource(s.to_string()))
    }
}

/// One LoRA adapter as a request names it.
#[derive(Clone, PartialEq)]
pub struct AdapterRef {
    /// Hub repository id, or a path for [`AdapterSource::Local`] (normalised by validation).
    pub id: String,
    /// Where to fetch it.
    pub source: AdapterSource,
    /// Hub revision; `None` means the default branch.
    pub revision: Option<String>,
    /// Token for private hub repositories (never logged).
    pub api_token: Option<String>,
}

impl fmt::Debug for AdapterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterRef")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("revision", &self.revision)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A per-request merge: its components in order and what to compute from them.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedAdapterSpec {
    /// The adapters, in merge order (one weight each in `merge.weights`).
    pub components: Vec<AdapterRef>,
    /// Strategy, weights, density, sign method, effective seed, SVD rank and semantics.
    pub merge: MergeSpec,
}

/// Which weights a request runs with.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AdapterSpec {
    /// The base model (adapter slot 0).
    #[default]
    Base,
    /// One adapter.
    Single(AdapterRef),
    /// A merge of several adapters, computed once by the shards and cached.
    Merged(MergedAdapterSpec),
}

impl AdapterSpec {
    /// True for the base model.
    pub fn is_base(&self) -> bool {
        matches!(self, AdapterSpec::Base)
    }

    /// The adapter ids, comma-separated (LoRAX's `x-adapter-id`); empty for the base model.
    pub fn ids(&self) -> String {
        match self {
            AdapterSpec::Base => String::new(),
            AdapterSpec::Single(r) => r.id.clone(),
            AdapterSpec::Merged(m) => m
                .components
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// `single` or `merged` (`base` for the base model): the `kind` label of adapter metrics.
    /// Where the adapter files come from (`None` for the base model; a merge reports its first
    /// component's source, like LoRAX's `x-adapter-source`).
    pub fn source(&self) -> Option<AdapterSource> {
        match self {
            AdapterSpec::Base => None,
            AdapterSpec::Single(r) => Some(r.source),
            AdapterSpec::Merged(m) => m.components.first().map(|c| c.source),
        }
    }

    /// `base`, `single` or `merged` (for metrics and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterSpec::Base => "base",
            AdapterSpec::Single(_) => "single",
            AdapterSpec::Merged(_) => "merged",
        }
    }

    /// The canonical identity of these weights.
    pub fn key(&self) -> AdapterKey {
        let mut out = Vec::with_capacity(256);
        put_str(&mut out, KEY_VERSION);
        match self {
            AdapterSpec::Base => out.push(0),
            AdapterSpec::Single(r) => {
                out.push(1);
                put_component(&mut out, r);
                put_token_scope(&mut out, std::iter::once(r));
            }
            AdapterSpec::Merged(m) => {
                out.push(2);
                put_merge_content(&mut out, &m.components, &m.merge);
                put_token_scope(&mut out, m.components.iter());
            }
        }
        AdapterKey(Sha256::digest(&out).into())
    }
}

/// The seed of a random (DARE) merge whose request gave none: derived from everything else that
/// determines the merge, so the same request always produces the same weights.
pub fn derived_merge_seed(components: &[AdapterRef], merge: &MergeSpec) -> u64 {
    let mut out = Vec::with_capacity(256);
    put_str(&mut out, "medley-merge-seed/v1");
    put_merge_content(&mut out, components, &merge.clone().with_seed(0));
    let digest: [u8; 32] = Sha256::digest(&out).into();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Version of the key encoding; bump it whenever the encoding changes.
const KEY_VERSION: &str = "medley-adapter-key/v1";

/// The canonical identity of an [`AdapterSpec`]: SHA-256 of its stable encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey([u8; 32]);

impl AdapterKey {
    /// The key of the base model.
    pub fn base() -> Self {
        AdapterSpec::Base.key()
    }

    /// The raw hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The whole hash in lower-case hex (64 digits); [`fmt::Display`] shows its first 12.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for AdapterKey {
    /// The first 12 hex digits (enough to tell adapters apart in logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..6]))
    }
}

impl fmt::Debug for AdapterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdapterKey({self})")
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_component(out: &mut Vec<u8>, r: &AdapterRef) {
    put_str(out, r.source.name());
    put_str(out, &r.id);
    match &r.revision {
        Some(rev) => {
            out.push(1);
            put_str(out, rev);
        }
        None => out.push(0),
    }
}

fn put_merge_content(out: &mut Vec<u8>, components: &[AdapterRef], merge: &MergeSpec) {
    out.extend_from_slice(&(components.len() as u64).to_le_bytes());
    for c in components {
        put_component(out, c);
    }
    let spec = merge.canonical_bytes();
    out.extend_from_slice(&(spec.len() as u64).to_le_bytes());
    out.extend_from_slice(&spec);
}

/// Hashes of the tokens, in component order (absent tokens encoded as a 0 byte).
fn put_token_scope<'a>(out: &mut Vec<u8>, refs: impl Iterator<Item = &'a AdapterRef>) {
    for r in refs {
        // Only hub downloads use the token: it does not tell local (or S3) adapters apart.
        match r
            .api_token
            .as_ref()
            .filter(|_| r.source == AdapterSource::Hub)
        {
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&Sha256::digest(t.as_bytes()));
            }
            None => out.push(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{Semantics, SignMethod, Strategy};

    fn hub(id: &str) -> AdapterRef {
        AdapterRef {
            id: id.into(),
            source: AdapterSource::Hub,
            revision: None,
            api_token: None,
        }
    }

    fn merged(ids: &[&str], merge: MergeSpec) -> AdapterSpec {
        AdapterSpec::Merged(MergedAdapterSpec {
            components: ids.iter().map(|i| hub(i)).collect(),
            merge,
        })
    }

    #[test]
    fn sources_parse_case_insensitively() {
        assert_eq!("HUB".parse::<AdapterSource>().unwrap(), AdapterSource::Hub);
        assert_eq!(
            " Local".parse::<AdapterSource>().unwrap(),
            AdapterSource::Local
        );
        assert_eq!("S3".parse::<AdapterSource>().unwrap(), AdapterSource::S3);
        let err = "gcs".parse::<AdapterSource>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "`adapter_source` must be one of hub, local, s3. Given: gcs"
        );
    }

    #[test]
    fn negative_zero_and_ignored_fields_share_a_key() {
        let a = merged(
            &["a", "b"],
            MergeSpec::new(Strategy::Linear, vec![0.0, 1.0]),
        );
        let b = merged(
            &["a", "b"],
            MergeSpec::new(Strategy::Linear, vec![-0.0, 1.0])
                .with_density(0.3)
                .with_sign_method(SignMethod::Frequency)
                .with_seed(7),
        );
        assert_eq!(
            a.key(),
            b.key(),
            "-0.0 is 0.0; linear ignores density/sign/seed"
        );
    }

    #[test]
    fn everything_that_changes_the_weights_changes_the_key() {
        let base = MergeSpec::new(Strategy::Ties, vec![1.0, 0.5]).with_density(0.2);
        let reference = merged(&["a", "b"], base.clone()).key();
        let variants = [
            merged(&["b", "a"], base.clone()),
            merged(&["a", "c"], base.clone()),
            merged(
                &["a", "b"],
                MergeSpec::new(Strategy::Ties, vec![1.0, 0.25]).with_density(0.2),
            ),
            merged(
                &["a", "b"],
                MergeSpec::new(Strategy::Ties, vec![1.0, 0.5]).with_density(0.3),
            ),
            merged(
                &["a", "b"],
                base.clone().with_sign_method(SignMethod::Frequency),
            ),
            merged(&["a", "b"], base.clone().with_semantics(Semantics::Lorax)),
            merged(
                &["a", "b"],
                MergeSpec::new(Strategy::DareTies, vec![1.0, 0.5]).with_density(0.2),
            ),
        ];
        for v in &variants {
            assert_ne!(v.key(), reference, "{v:?}");
        }
        // Sources, revisions and tokens are part of the identity.
        let mut local = hub("a");
        local.source = AdapterSource::Local;
        let mut rev = hub("a");
        rev.revision = Some("v2".into());
        let mut token = hub("a");
        token.api_token = Some("secret".into());
        let single = AdapterSpec::Single(hub("a")).key();
        for r in [local, rev, token] {
            assert_ne!(AdapterSpec::Single(r.clone()).key(), single, "{r:?}");
        }
        // A single adapter is not a one-component merge, and neither is the base model.
        assert_ne!(
            merged(&["a"], MergeSpec::new(Strategy::Linear, vec![1.0])).key(),
            single
        );
        assert_ne!(AdapterKey::base(), single);
    }

    #[test]
    fn derived_seeds_are_stable_and_specific() {
        let comps = vec![hub("a"), hub("b")];
        let spec = MergeSpec::new(Strategy::DareLinear, vec![1.0, 0.5]).with_density(0.5);
        let s1 = derived_merge_seed(&comps, &spec);
        // The seed field itself does not feed the derivation.
        assert_eq!(s1, derived_merge_seed(&comps, &spec.clone().with_seed(99)));
        let other = MergeSpec::new(Strategy::DareLinear, vec![1.0, 0.75]).with_density(0.5);
        assert_ne!(s1, derived_merge_seed(&comps, &other));
        assert_ne!(s1, derived_merge_seed(&[hub("b"), hub("a")], &spec));
        // Pinned: changing the derivation or the key encoding silently would change every
        // unseeded DARE merge and every cache key (bump the version strings instead).
        assert_eq!(s1, 15188397836307519303);
        let with_seed = merged(&["a", "b"], spec.clone().with_seed(s1));
        assert_eq!(
            hex::encode(with_seed.key().as_bytes()),
            "522fa151fe00077710c4f131329dc59349c512fade72e1cf50d3d912c15dd1c2"
        );
        let other_seed = merged(&["a", "b"], spec.with_seed(s1 ^ 1));
        assert_ne!(
            with_seed.key(),
            other_seed.key(),
            "DARE keys include the seed"
        );
    }

    #[test]
    fn only_hub_adapters_are_scoped_by_their_token() {
        let with_token = |source: AdapterSource, token: Option<&str>| {
            AdapterSpec::Single(AdapterRef {
                id: "org/x".into(),
                source,
                revision: None,
                api_token: token.map(str::to_string),
            })
            .key()
        };
        let hub = AdapterSource::Hub;
        assert_ne!(with_token(hub, None), with_token(hub, Some("t1")));
        assert_ne!(with_token(hub, Some("t1")), with_token(hub, Some("t2")));
        // A token cannot change what a local directory holds: one cache entry for all.
        let local = AdapterSource::Local;
        assert_eq!(with_token(local, None), with_token(local, Some("t1")));
    }

    #[test]
    fn tokens_are_redacted_in_debug_output() {
        let mut r = hub("org/private");
        r.api_token = Some("hf_secret".into());
        let text = format!("{:?}", AdapterSpec::Single(r));
        assert!(
            !text.contains("hf_secret") && text.contains("<redacted>"),
            "{text}"
        );
    }
}
