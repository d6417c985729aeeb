//! Score-level math of the token chooser: loading logits, the penalties, temperature, a fast
//! exponential and log-sum-exp, argmax, and prompt logprobs. The candidate-set warpers
//! (top-k, top-p, typical-p) and the draw live in [`super::candidates`].
//!
//! Semantics follow Hugging Face `transformers` (`RepetitionPenaltyLogitsProcessor`,
//! `TemperatureLogitsWarper`), which TGI and LoRAX use too. Everything here is a linear pass
//! written so that the compiler can vectorise it: these run once per token per sequence over
//! vocabularies of up to ~128k entries.

use super::params::SamplingParams;

/// Lanes of the partial sums in [`sum_exp`] (a fixed, deterministic summation order that the
/// compiler can vectorise).
const LANES: usize = 8;

/// `e^x` in f32 without a libm call (Cephes `expf`: range reduction by `ln 2`, degree-6
/// polynomial), so that loops over the vocabulary vectorise. Relative error below 3e-7 for
/// `x` in `[-87, 88]` (tested against `f32::exp`); exactly 0 below -87 (where `e^x < 2e-38`),
/// so `-inf` scores get weight 0; saturates near `e^88` above.
#[inline]
#[allow(clippy::excessive_precision)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and a correction.
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let poly = (((((1.987_569_15e-4 * r + 1.398_199_95e-3) * r + 8.333_451_9e-3) * r
        + 4.166_579_59e-2)
        * r
        + 1.666_666_55e-1)
        * r
        + 5.000_000_12e-1)
        * (r * r)
        + r
        + 1.0;
    // 2^n built in the exponent field. Wrapping ops: n is in [-126, 127] so nothing wraps,
    // and unchecked arithmetic keeps debug builds (overflow checks on) vectorisable.
    let exponent = (t.to_bits() as i32)
        .wrapping_sub(ROUND_BITS)
        .wrapping_add(127);
    let scale = f32::from_bits(exponent.wrapping_shl(23) as u32);
    // Zero below -87 without a branch: a branch here stops the vectoriser.
    let keep = u32::from(x >= -87.0).wrapping_neg();
    f32::from_bits((poly * scale).to_bits() & keep)
}

/// `Σ e^(x - shift)` over `xs`, accumulated in f64 over [`LANES`] partial sums.
pub(crate) fn sum_exp(xs: &[f32], shift: f32) -> f64 {
    let (chunks, rest) = xs.as_chunks::<LANES>();
    let mut acc = [0.0f64; LANES];
    for chunk in chunks {
        let mut e = [0.0f32; LANES];
        for (e, &x) in e.iter_mut().zip(chunk) {
            *e = fast_exp(x - shift);
        }
        for (a, &e) in acc.iter_mut().zip(&e) {
            *a += f64::from(e);
        }
    }
    let tail: f64 = rest.iter().map(|&x| f64::from(fast_exp(x - shift))).sum();
    acc.iter().sum::<f64>() + tail
}

/// `p ln p` for `p = e^lp`, in f64; 0 where `p` is 0 (HF's `nansum` of `0 · -inf`).
#[inline]
pub(crate) fn p_log_p(lp: f32) -> f64 {
    let p = f64::from(fast_exp(lp));
    if p > 0.0 { p * f64::from(lp) } else { 0.0 }
}

/// `Σ p ln p` with `p = e^(x - log_z)` over `xs` (minus the entropy), over [`LANES`] partial
/// sums like [`sum_exp`].
pub(crate) fn sum_p_log_p(xs: &[f32], log_z: f32) -> f64 {
    let (chunks, rest) = xs.as_chunks::<LANES>();
    let mut acc = [0.0f64; LANES];
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += p_log_p(x - log_z);
        }
    }
    let tail: f64 = rest.iter().map(|&x| p_log_p(x - log_z)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Largest value of `xs` (`-inf` when empty).
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `ln Σ e^x` over `xs`; `-inf` when empty or all `-inf`.
pub(crate) fn log_sum_exp(xs: &[f32]) -> f32 {
    log_sum_exp_with_max(xs, max_of(xs))
}

/// [`log_sum_exp`] when the caller already knows `max`, the largest value of `xs`.
pub(crate) fn log_sum_exp_with_max(xs: &[f32], max: f32) -> f32 {
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + sum_exp(xs, max).ln() as f32
}

/// Copies `logits` into `scores`, replacing values the softmax cannot handle: NaN becomes
/// `-inf` (never chosen), `+inf` becomes `f32::MAX`, and a row without any finite value
/// becomes all zeros (uniform) so that the distribution stays defined.
pub(crate) fn load_scores(scores: &mut Vec<f32>, logits: &[f32]) {
    scores.clear();
    scores.extend(logits.iter().map(|&x| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x.min(f32::MAX)
        }
    }));
    if max_of(scores) == f32::NEG_INFINITY {
        scores.fill(0.0);
    }
}

/// Applies, in this order, the Hugging Face repetition penalty and the OpenAI frequency and
/// presence penalties to every token id that occurs in `history` (ids outside the vocabulary
/// are ignored).
///
/// * Repetition (HF `RepetitionPenaltyLogitsProcessor`): `s / r` if `s >= 0`, else `s * r`,
///   once per distinct token.
/// * Frequency/presence (OpenAI): `s -= frequency * count + presence * (count > 0)`.
///
/// `history` is the whole sequence (prompt + generated), as TGI's penalty processors see
/// `input_ids`; OpenAI and vLLM count frequency/presence over generated tokens only, which
/// the caller can get by passing only those. `counts` is scratch of at least the vocabulary's
/// length, all zeros on entry and left all zeros on return; the cost is O(history).
pub(crate) fn apply_penalties(
    scores: &mut [f32],
    counts: &mut [u32],
    history: &[u32],
    params: &SamplingParams,
) {
    if !params.has_penalties() {
        return;
    }
    let vocab = scores.len().min(counts.len());
    for &t in history {
        let t = t as usize;
        if t < vocab {
            counts[t] += 1;
        }
    }
    let rep = params.repetition_penalty;
    for &t in history {
        let t = t as usize;
        if t >= vocab || counts[t] == 0 {
            continue;
        }
        let mut s = scores[t];
        if rep != 1.0 {
            s = if s < 0.0 { s * rep } else { s / rep };
        }
        s -= params.frequency_penalty * counts[t] as f32 + params.presence_penalty;
        scores[t] = s;
        // Zeroing marks the token as done and restores the scratch invariant.
        counts[t] = 0;
    }
}

/// Divides the scores by `temperature` (HF `TemperatureLogitsWarper`), after subtracting the
/// maximum — a shift that no later step can observe — so that a tiny temperature sends the
/// other scores to `-inf` instead of overflowing the maximum to `+inf`.
pub(crate) fn apply_temperature(scores: &mut [f32], temperature: f32) {
    let max = max_of(scores);
    for s in scores.iter_mut() {
        *s = (*s - max) / temperature;
    }
}

/// Index of the largest score, the lowest id among equals; `None` for an empty slice.
pub(crate) fn argmax(scores: &[f32]) -> Option<usize> {
    let (&first, rest) = scores.split_first()?;
    let (mut best, mut value) = (0, first);
    for (i, &s) in rest.iter().enumerate() {
        if s > value {
            best = i + 1;
            value = s;
        }
    }
    Some(best)
}

/// Log-probability of each `targets[i]` under the softmax of row `i` of `logits`, a
/// `[rows, vocab]` row-major slice — the prompt logprobs of `decoder_input_details`, taken on
/// the raw logits as TGI does. An entry is NaN when row `i` is missing or `targets[i]` is not
/// below `vocab` (a caller bug, reported without panicking).
pub fn token_logprobs(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f32> {
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = i
                .checked_mul(vocab)
                .and_then(|start| logits.get(start..start.checked_add(vocab)?));
            match row {
                Some(row) if vocab > 0 => row
                    .get(t as usize)
                    .map_or(f32::NAN, |&x| x - log_sum_exp(row)),
                _ => f32::NAN,
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "logits_tests.rs"]
mod tests;
