//! The canonical description of a merge (what to compute, not which adapters), with a stable byte
//! encoding and a SHA-256 content hash: the router keys its merge cache on it together with the
//! resolved component ids.

use sha2::{Digest, Sha256};

use crate::names::{Semantics, SignMethod, Strategy};

/// Version of the engine's numerics folded into every encoding; bumped whenever the same
/// description would produce different tensors (e.g. a change of the randomized SVD parameters).
pub const ENGINE_NUMERICS_VERSION: &str = "medley-merge-numerics/1";

/// Everything that determines a merge besides the component adapters themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec {
    /// Combination strategy.
    pub strategy: Strategy,
    /// One weight per component, in component order.
    pub weights: Vec<f32>,
    /// Fraction of values kept by pruning strategies, in [0, 1]; required by them.
    pub density: Option<f32>,
    /// Majority sign election for TIES-style strategies.
    pub sign_method: SignMethod,
    /// Seed of the DARE masks (ignored by deterministic strategies).
    pub seed: u64,
    /// Output rank of the SVD family (default: the largest component rank).
    pub svd_rank: Option<usize>,
    /// PEFT's `svd_clamp`: clamp the SVD factors to this quantile of their entries.
    pub svd_clamp: Option<f32>,
    /// Reference semantics to reproduce.
    pub semantics: Semantics,
}

impl MergeSpec {
    /// A spec with the given strategy and weights and defaults for everything else
    /// (no density, `total`, seed 0, default SVD rank, no clamp, PEFT semantics).
    pub fn new(strategy: Strategy, weights: Vec<f32>) -> Self {
        Self {
            strategy,
            weights,
            density: None,
            sign_method: SignMethod::Total,
            seed: 0,
            svd_rank: None,
            svd_clamp: None,
            semantics: Semantics::Peft,
        }
    }

    /// Sets the density.
    pub fn with_density(mut self, density: f32) -> Self {
        self.density = Some(density);
        self
    }

    /// Sets the majority sign method.
    pub fn with_sign_method(mut self, method: SignMethod) -> Self {
        self.sign_method = method;
        self
    }

    /// Sets the DARE seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the SVD output rank.
    pub fn with_svd_rank(mut self, rank: usize) -> Self {
        self.svd_rank = Some(rank);
        self
    }

    /// Sets the SVD clamp quantile.
    pub fn with_svd_clamp(mut self, quantile: f32) -> Self {
        self.svd_clamp = Some(quantile);
        self
    }

    /// Sets the semantics.
    pub fn with_semantics(mut self, semantics: Semantics) -> Self {
        self.semantics = semantics;
        self
    }

    /// The equivalent spec in canonical form: fields the strategy ignores are reset to their
    /// defaults, `-0.0` becomes `0.0`, and strategies that reduce to another one are renamed
    /// (a single component is a plain `linear`; pruning at density >= 1 prunes nothing, so
    /// `magnitude_prune`/`dare_linear` become `linear`, `dare_ties` becomes `ties` at density 1,
    /// and likewise for the SVD variants). Two specs with equal canonical forms produce the same
    /// tensors from the same components.
    pub fn canonical(&self) -> MergeSpec {
        let mut s = self.clone();
        s.weights.iter_mut().for_each(|w| *w = zero_sign(*w));
        s.density = s.density.map(zero_sign);
        s.svd_clamp = s.svd_clamp.map(zero_sign);
        if s.weights.len() == 1 {
            // PEFT forces `linear` for one adapter; LoRAX loads the single adapter as is and
            // ignores its weight.
            s.strategy = Strategy::Linear;
            if s.semantics == Semantics::Lorax {
                s.weights[0] = 1.0;
            }
        }
        if s.strategy.uses_density() && s.density.is_some_and(|d| d >= 1.0) {
            s.strategy = match s.strategy {
                Strategy::MagnitudePrune | Strategy::DareLinear => Strategy::Linear,
                Strategy::DareTies => Strategy::Ties,
                Strategy::MagnitudePruneSvd | Strategy::DareLinearSvd => Strategy::Svd,
                Strategy::DareTiesSvd => Strategy::TiesSvd,
                other => other,
            };
            s.density = Some(1.0);
        }
        if !s.strategy.uses_density() {
            s.density = None;
        }
        if !s.strategy.uses_sign_method() {
            s.sign_method = SignMethod::Total;
        }
        if !s.strategy.is_random() {
            s.seed = 0;
        }
        if !s.strategy.is_svd() {
            s.svd_rank = None;
            s.svd_clamp = None;
        }
        s
    }

    /// Stable byte encoding of the canonical form (little-endian integers, floats as `f32` bit
    /// patterns, lower-case names as length-prefixed UTF-8).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let c = self.canonical();
        let mut out = Vec::with_capacity(96 + 4 * c.weights.len());
        put_str(&mut out, "medley-merge-spec/v1");
        put_str(&mut out, ENGINE_NUMERICS_VERSION);
        put_str(&mut out, c.semantics.name());
        put_str(&mut out, c.strategy.name());
        put_opt_f32(&mut out, c.density);
        put_str(&mut out, c.sign_method.name());
        out.extend_from_slice(&c.seed.to_le_bytes());
        match c.svd_rank {
            Some(r) => {
                out.push(1);
                out.extend_from_slice(&(r as u64).to_le_bytes());
            }
            None => out.push(0),
        }
        put_opt_f32(&mut out, c.svd_clamp);
        out.extend_from_slice(&(c.weights.len() as u64).to_le_bytes());
        for w in &c.weights {
            out.extend_from_slice(&w.to_bits().to_le_bytes());
        }
        out
    }

    /// SHA-256 of [`canonical_bytes`](Self::canonical_bytes).
    pub fn content_hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical_bytes()).into()
    }

    /// [`content_hash`](Self::content_hash) as lower-case hex.
    pub fn content_hash_hex(&self) -> String {
        hex::encode(self.content_hash())
    }
}

fn zero_sign(x: f32) -> f32 {
    if x == 0.0 { 0.0 } else { x }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_f32(out: &mut Vec<u8>, v: Option<f32>) {
    match v {
        Some(x) => {
            out.push(1);
            out.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        None => out.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irrelevant_fields_do_not_change_the_key() {
        let a = MergeSpec::new(Strategy::Linear, vec![1.0, 0.5]);
        let b = a
            .clone()
            .with_density(0.3)
            .with_seed(9)
            .with_sign_method(SignMethod::Frequency);
        assert_eq!(a.content_hash(), b.content_hash());
        let c = MergeSpec::new(Strategy::Ties, vec![1.0, 0.5]).with_density(0.3);
        assert_ne!(
            c.content_hash(),
            c.clone()
                .with_sign_method(SignMethod::Frequency)
                .content_hash()
        );
        assert_eq!(c.content_hash(), c.clone().with_seed(4).content_hash());
        let d = MergeSpec::new(Strategy::DareTies, vec![1.0, 0.5]).with_density(0.3);
        assert_ne!(d.content_hash(), d.clone().with_seed(4).content_hash());
    }

    #[test]
    fn negative_zero_and_equivalent_strategies() {
        let a = MergeSpec::new(Strategy::Linear, vec![0.0, 1.0]);
        let b = MergeSpec::new(Strategy::Linear, vec![-0.0, 1.0]);
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        let m = MergeSpec::new(Strategy::MagnitudePrune, vec![0.0, 1.0]).with_density(1.0);
        assert_eq!(m.content_hash(), a.content_hash());
        let dt = MergeSpec::new(Strategy::DareTies, vec![1.0, 2.0])
            .with_density(1.0)
            .with_seed(5);
        let t = MergeSpec::new(Strategy::Ties, vec![1.0, 2.0]).with_density(1.0);
        assert_eq!(dt.content_hash(), t.content_hash());
    }

    #[test]
    fn single_component_and_semantics() {
        let a = MergeSpec::new(Strategy::TiesSvd, vec![0.5]).with_density(0.2);
        assert_eq!(a.canonical().strategy, Strategy::Linear);
        let l1 = MergeSpec::new(Strategy::Ties, vec![0.5]).with_semantics(Semantics::Lorax);
        let l2 = MergeSpec::new(Strategy::Linear, vec![3.0]).with_semantics(Semantics::Lorax);
        assert_eq!(l1.content_hash(), l2.content_hash());
        let p = MergeSpec::new(Strategy::Linear, vec![1.0, 1.0]);
        assert_ne!(
            p.content_hash(),
            p.clone().with_semantics(Semantics::Lorax).content_hash()
        );
        // Order of weights matters.
        let x = MergeSpec::new(Strategy::Linear, vec![1.0, 2.0]);
        let y = MergeSpec::new(Strategy::Linear, vec![2.0, 1.0]);
        assert_ne!(x.content_hash(), y.content_hash());
    }

    #[test]
    fn encoding_is_stable() {
        // Pins the byte encoding and hash: changing either silently would invalidate every cache
        // key (bump the version strings instead).
        let s = MergeSpec::new(Strategy::Ties, vec![2.0, 0.3, 0.7]).with_density(0.2);
        assert_eq!(
            s.content_hash_hex(),
            "bb3e7b8dbc648c42dff54bab788ec820e5646e3e6de5411f60856cb34f6da02e"
        );
        let bytes = s.canonical_bytes();
        assert_eq!(&bytes[..4], &20u32.to_le_bytes());
        assert_eq!(&bytes[4..24], b"medley-merge-spec/v1");
        assert_eq!(&bytes[bytes.len() - 4..], &0.7f32.to_bits().to_le_bytes());
    }
}
