//! Keyed, order-independent random streams.
//!
//! Every random draw of a merge comes from a ChaCha8 stream whose 256-bit key is the SHA-256 of a
//! domain tag and the identity of the tensor being drawn for: (seed, module name, side, component
//! index). Streams therefore never depend on thread scheduling, on the order modules are
//! processed in, or on which other modules exist; the same seed gives the same masks in every
//! process. ChaCha8 output is value-stable in `rand_chacha` (it is a fixed cipher).

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Which tensor of a module a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamSide {
    /// The `lora_A` factor.
    A,
    /// The `lora_B` factor.
    B,
    /// The full delta `s B A` (SVD family).
    Delta,
    /// The random test matrix of the randomized SVD of a module.
    SvdSketch,
}

impl StreamSide {
    fn tag(self) -> u8 {
        match self {
            StreamSide::A => 0,
            StreamSide::B => 1,
            StreamSide::Delta => 2,
            StreamSide::SvdSketch => 3,
        }
    }
}

/// A ChaCha8 stream keyed by `(seed, module, side, component)`.
pub(crate) fn keyed_stream(
    seed: u64,
    module: &str,
    side: StreamSide,
    component: u64,
) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"medley-merge/stream/v1\0");
    h.update(seed.to_le_bytes());
    h.update((module.len() as u64).to_le_bytes());
    h.update(module.as_bytes());
    h.update([side.tag()]);
    h.update(component.to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

#[cfg(any(test, feature = "testing"))]
/// A ChaCha8 stream for fixture tensors, keyed by `(seed, module, side)` in its own domain.
pub(crate) fn fixture_stream(seed: u64, module: &str, side: StreamSide) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"medley-merge/fixture/v1\0");
    h.update(seed.to_le_bytes());
    h.update((module.len() as u64).to_le_bytes());
    h.update(module.as_bytes());
    h.update([side.tag()]);
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// Bernoulli(`density`) masks from a keyed stream: an element is kept when the next 32-bit word
/// of the stream is below `floor(density * 2^32)`.
pub(crate) struct Bernoulli {
    rng: ChaCha8Rng,
    /// Keep when the next `u32` is below this; `None` keeps everything (density 1).
    threshold: Option<u32>,
    words: Vec<u32>,
}

impl Bernoulli {
    /// Draws from `rng` with keep probability `density` (clamped to [0, 1]).
    pub(crate) fn new(rng: ChaCha8Rng, density: f64) -> Self {
        let d = density.clamp(0.0, 1.0);
        // Exact for d = 0 and d = 1; otherwise the nearest multiple of 2^-32 below d (which is
        // at most 2^32 - 1 for d < 1).
        let threshold = (d < 1.0).then(|| (d * 4_294_967_296.0).floor() as u32);
        Self {
            rng,
            threshold,
            words: Vec::new(),
        }
    }

    /// Writes the kept values of `src` (divided by `rescale` when set) to `dst`, zero elsewhere,
    /// consuming one stream word per element.
    pub(crate) fn apply(&mut self, src: &[f32], dst: &mut [f32], rescale: Option<f32>) {
        self.words.resize(src.len(), 0);
        self.rng.fill(&mut self.words[..]);
        let Some(t) = self.threshold else {
            match rescale {
                Some(div) => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x / div),
                None => dst.copy_from_slice(src),
            }
            return;
        };
        if t == 0 {
            // Density 0 drops everything (PEFT would compute 0/0 = NaN here).
            dst.fill(0.0);
            return;
        }
        // Branch-free, in PEFT's order: `(x * mask) / d`.
        match rescale {
            Some(div) => {
                for ((d, &x), &u) in dst.iter_mut().zip(src).zip(&self.words) {
                    let mask = if u < t { 1.0f32 } else { 0.0 };
                    *d = (x * mask) / div;
                }
            }
            None => {
                for ((d, &x), &u) in dst.iter_mut().zip(src).zip(&self.words) {
                    let mask = if u < t { 1.0f32 } else { 0.0 };
                    *d = x * mask;
                }
            }
        }
    }
}

/// Uniform values in [-1, 1) from a keyed stream (the sketch matrix of the randomized SVD).
pub(crate) fn fill_uniform_pm1(rng: &mut ChaCha8Rng, out: &mut [f32]) {
    for v in out.iter_mut() {
        // 24 random bits -> [0, 1) exactly representable in f32, then map to [-1, 1).
        let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
        *v = 2.0 * u - 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_keyed_and_reproducible() {
        let mut a = keyed_stream(7, "m.q_proj", StreamSide::A, 0);
        let mut b = keyed_stream(7, "m.q_proj", StreamSide::A, 0);
        let mut c = keyed_stream(7, "m.q_proj", StreamSide::B, 0);
        let mut d = keyed_stream(8, "m.q_proj", StreamSide::A, 0);
        let xa: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
        let xb: Vec<u32> = (0..8).map(|_| b.next_u32()).collect();
        let xc: Vec<u32> = (0..8).map(|_| c.next_u32()).collect();
        let xd: Vec<u32> = (0..8).map(|_| d.next_u32()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        assert_ne!(xa, xd);
    }

    #[test]
    fn bernoulli_extremes_are_exact_and_chunking_is_invisible() {
        let src = vec![1.0f32; 10_000];
        let mut dst = vec![0.0f32; 10_000];
        Bernoulli::new(keyed_stream(1, "x", StreamSide::A, 0), 1.0).apply(&src, &mut dst, None);
        assert!(dst.iter().all(|&v| v == 1.0));
        Bernoulli::new(keyed_stream(1, "x", StreamSide::A, 0), 0.0).apply(
            &src,
            &mut dst,
            Some(0.0),
        );
        assert!(dst.iter().all(|&v| v == 0.0));
        let mut whole = vec![0.0f32; 10_000];
        Bernoulli::new(keyed_stream(2, "x", StreamSide::B, 1), 0.5).apply(
            &src,
            &mut whole,
            Some(0.5),
        );
        let mut b = Bernoulli::new(keyed_stream(2, "x", StreamSide::B, 1), 0.5);
        let mut chunked = vec![0.0f32; 10_000];
        for (s, d) in src.chunks(777).zip(chunked.chunks_mut(777)) {
            b.apply(s, d, Some(0.5));
        }
        assert_eq!(whole, chunked);
        assert!(whole.iter().all(|&v| v == 0.0 || v == 2.0));
    }
}
