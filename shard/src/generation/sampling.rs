//! The per-sequence next-token chooser: penalties, warpers, then a greedy or seeded random
//! choice, with the log-probabilities that the API reports.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::candidates::Candidates;
use super::logits::{
    apply_penalties, apply_temperature, argmax, load_scores, log_sum_exp_with_max,
};
use super::params::{SamplingError, SamplingParams};

/// One chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The token id.
    pub id: u32,
    /// Its log-probability under the final processed distribution (after penalties and, when
    /// sampling, the warpers), as TGI reports it.
    pub logprob: f32,
    /// The `top_n` most likely tokens of that same distribution as `(id, logprob)`, most likely
    /// first, ties toward the lower id. Only tokens the warpers kept are listed (a removed token
    /// has logprob `-inf`, which JSON cannot carry), so there may be fewer than `top_n`.
    pub top: Vec<(u32, f32)>,
}

/// Chooses the next token of one sequence; create one per sequence and keep it for the
/// sequence's life, since it owns the sequence's random stream.
///
/// Per step: the logits are copied into a reusable buffer; the repetition, frequency and
/// presence penalties are applied over `history`; then, when sampling (see
/// [`SamplingParams::is_sampling`]), temperature, top-k, top-p and typical-p in TGI's order,
/// and a draw from the remaining distribution; otherwise the argmax (ties toward the lower
/// id). The draw takes exactly one `f64` from a ChaCha8 stream seeded with
/// [`SamplingParams::seed`] and inverts the cumulative distribution, so the same seed and the
/// same logits give the same tokens on every machine and rank. Buffers are sized on the first
/// step and reused; a step allocates only the returned `top` list. The `candidates`
/// module documents the cost of each warper.
pub struct Sampler {
    params: SamplingParams,
    sampling: bool,
    rng: ChaCha8Rng,
    scores: Vec<f32>,
    counts: Vec<u32>,
    candidates: Candidates,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("sampling", &self.sampling)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Checks `params` (see [`SamplingParams::validate`]) and seeds the random stream.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        Ok(Self::checked(params))
    }

    /// Greedy decoding with every processor off ([`SamplingParams::default`], valid as it is).
    pub fn greedy() -> Self {
        Self::checked(SamplingParams::default())
    }

    /// A sampler of `params`, which passed [`SamplingParams::validate`].
    fn checked(params: SamplingParams) -> Self {
        Self {
            params,
            sampling: params.is_sampling(),
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            scores: Vec::new(),
            counts: Vec::new(),
            candidates: Candidates::default(),
        }
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when the next token is the argmax rather than a random draw.
    pub fn is_greedy(&self) -> bool {
        !self.sampling
    }

    /// Chooses the next token from `logits` (raw f32 logits over the vocabulary for the next
    /// position), with `history` (every token id so far, prompt and generated) feeding the
    /// penalties, and returns it with its logprob and the `top_n` most likely alternatives.
    ///
    /// An empty `logits` slice (a caller bug; the model's vocabulary is never empty) yields
    /// id 0 with a NaN logprob and is logged, rather than panicking.
    pub fn next(&mut self, logits: &[f32], history: &[u32], top_n: usize) -> Sample {
        if logits.is_empty() {
            tracing::error!("sampler called with empty logits");
            return Sample {
                id: 0,
                logprob: f32::NAN,
                top: Vec::new(),
            };
        }
        self.prepare(logits, history);
        if self.sampling {
            self.warp();
            let u: f64 = self.rng.random();
            // `sample` fails only for an empty candidate set, which the warpers never leave.
            let (id, log_z) = self
                .candidates
                .sample(&self.scores, u)
                .unwrap_or_else(|| (argmax(&self.scores).unwrap_or(0) as u32, f32::NAN));
            let top = self.candidates.top_n(&self.scores, top_n, log_z);
            Sample {
                id,
                logprob: self.scores[id as usize] - log_z,
                top,
            }
        } else {
            let id = argmax(&self.scores).unwrap_or(0);
            let log_z = log_sum_exp_with_max(&self.scores, self.scores[id]);
            self.candidates.reset();
            let top = self.candidates.top_n(&self.scores, top_n, log_z);
            Sample {
                id: id as u32,
                logprob: self.scores[id] - log_z,
                top,
            }
        }
    }

    /// Loads the logits into the score buffer and applies the penalties.
    fn prepare(&mut self, logits: &[f32], history: &[u32]) {
        load_scores(&mut self.scores, logits);
        if self.counts.len() < self.scores.len() {
            self.counts.resize(self.scores.len(), 0);
        }
        apply_penalties(&mut self.scores, &mut self.counts, history, &self.params);
    }

    /// Applies temperature, top-k, top-p and typical-p (each only when active) to the scores
    /// and the candidate set.
    fn warp(&mut self) {
        let p = self.params;
        if p.temperature != 1.0 {
            apply_temperature(&mut self.scores, p.temperature);
        }
        self.candidates.reset();
        self.candidates.top_k(&self.scores, p.top_k as usize);
        self.candidates.top_p(&self.scores, p.top_p);
        self.candidates.typical_p(&self.scores, p.typical_p);
    }
}

#[cfg(test)]
#[path = "sampling_tests.rs"]
mod tests;
