//! The candidate set of the token chooser: the warpers that shrink it (Hugging Face
//! `TopKLogitsWarper`, `TopPLogitsWarper`, `TypicalLogitsWarper`, all with
//! `min_tokens_to_keep = 1`), the top-n list, and the random draw from it.
//!
//! Instead of writing `-inf` into removed tokens' scores, the warpers shrink a list of ids, and
//! "every id" is represented without materialising it. Costs per step over a vocabulary of V:
//!
//! * top-n and top-k with `n, k <= 256`: one sequential scan keeping a small sorted buffer;
//!   larger values fall back to `select_nth_unstable`.
//! * top-p and typical-p: the candidates are split into bands of the ordering key (score
//!   distance to the maximum, or distance to the entropy) by linear scans; each band is walked
//!   in order by sorting its front in growing chunks found with `select_nth_unstable`, and the
//!   walk stops as soon as the probability mass is reached. A peaked distribution costs a scan
//!   or two and a small sort; no case sorts the whole vocabulary.
//!
//! Ordering conventions: "descending score" breaks ties toward the lower token id, so every
//! result is deterministic.

use std::cmp::Ordering;
use std::mem;

use super::logits::{fast_exp, log_sum_exp, max_of, p_log_p, sum_exp, sum_p_log_p};

/// Largest `n` (or `k`) served by one scan with a sorted buffer of that size.
const SCAN_LIMIT: usize = 256;

/// Size of the first chunk that [`visit_in_order`] sorts; later chunks grow 4× each time.
const FIRST_CHUNK: usize = 64;

/// Upper bounds of the bands of [`Candidates::visit_banded`], in units of the ordering key
/// (nats for both top-p and typical-p); the last band takes the rest, `+inf` included.
const BANDS: [f32; 5] = [1.0, 3.0, 8.0, 20.0, f32::INFINITY];

/// Comparator "higher score first, then lower id" over ids into `scores` (which hold no NaN).
pub(crate) fn by_score_desc(scores: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + Copy + '_ {
    move |&a, &b| {
        scores[b as usize]
            .partial_cmp(&scores[a as usize])
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    }
}

/// Fills `out` with the `n` best `(id, score)` of `items` — given in ascending id order — by
/// descending score, ties toward the lower id, in that order.
fn best_n(items: impl Iterator<Item = (u32, f32)>, n: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    for (id, s) in items {
        if out.len() == n {
            if out.last().is_some_and(|&(_, worst)| s <= worst) {
                continue;
            }
            out.pop();
        }
        let pos = out.partition_point(|&(_, t)| t >= s);
        out.insert(pos, (id, s));
    }
}

/// Walks `ids` in ascending `cmp` order without sorting more than needed: sorts the next
/// chunk of the front (found by a linear-time selection), hands its elements to `visit` in
/// order, and stops when `visit` returns `false`. Returns `Some(count visited)` when stopped,
/// `None` when every element was visited; either way the visited elements form a sorted
/// prefix of `ids`.
fn visit_in_order<C, V>(ids: &mut [u32], cmp: C, visit: &mut V) -> Option<usize>
where
    C: Fn(&u32, &u32) -> Ordering + Copy,
    V: FnMut(u32) -> bool,
{
    let n = ids.len();
    let mut done = 0;
    let mut chunk = FIRST_CHUNK;
    while done < n {
        let end = (done + chunk).min(n);
        let rest = &mut ids[done..];
        if end < n {
            rest.select_nth_unstable_by(end - done - 1, cmp);
        }
        rest[..end - done].sort_unstable_by(cmp);
        for (offset, &id) in ids[done..end].iter().enumerate() {
            if !visit(id) {
                return Some(done + offset + 1);
            }
        }
        done = end;
        chunk = chunk.saturating_mul(4);
    }
    None
}

/// Walks `(id, score)` pairs, drawing the token at which the running sum of
/// `e^(score - max)` first exceeds `target`; when rounding leaves the sum short of `target`,
/// the last token with any weight.
fn walk(items: impl Iterator<Item = (u32, f32)>, max: f32, target: f64) -> Option<u32> {
    let mut acc = 0.0f64;
    let mut last = None;
    for (id, s) in items {
        let w = f64::from(fast_exp(s - max));
        if w > 0.0 {
            acc += w;
            last = Some(id);
            if acc > target {
                break;
            }
        }
    }
    last
}

/// [`walk`] over every id of `scores`, skipping whole blocks by their (vectorised) weight sum
/// while the running sum stays at or below `target`.
fn walk_blocks(scores: &[f32], max: f32, target: f64) -> Option<u32> {
    const BLOCK: usize = 256;
    let mut acc = 0.0f64;
    let mut last_block = None;
    for (b, block) in scores.chunks(BLOCK).enumerate() {
        let mass = sum_exp(block, max);
        let items = block
            .iter()
            .enumerate()
            .map(move |(i, &s)| ((b * BLOCK + i) as u32, s));
        if acc + mass > target {
            return walk(items, max, target - acc);
        }
        if mass > 0.0 {
            acc += mass;
            last_block = Some(items);
        }
    }
    // Rounding left `target` unreached: the last id with any weight.
    last_block.and_then(|items| walk(items, max, f64::INFINITY))
}

/// The token ids still allowed after the warpers: every id of the score vector (the state
/// after [`reset`](Self::reset)) or an explicit list. Buffers are reused across steps, so a
/// step allocates nothing once they have grown.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    /// Every id of the score vector is allowed; `ids` is unused.
    all: bool,
    /// The allowed ids when `!all`.
    ids: Vec<u32>,
    /// `ids` is in descending-score order.
    sorted: bool,
    /// Scratch: the band being walked.
    band: Vec<u32>,
    /// Scratch: the next `ids`.
    spare: Vec<u32>,
    /// Scratch: the small sorted buffer of the scans.
    best: Vec<(u32, f32)>,
}

impl Candidates {
    /// Allows every id.
    pub(crate) fn reset(&mut self) {
        self.all = true;
        self.ids.clear();
        self.sorted = false;
    }

    /// Number of allowed ids, for a score vector of `vocab` entries.
    pub(crate) fn len(&self, vocab: usize) -> usize {
        if self.all { vocab } else { self.ids.len() }
    }

    /// Calls `f(id, score)` for every allowed id: in id order when all are allowed, otherwise
    /// in list order (unspecified unless a warper sorted the list).
    pub(crate) fn for_each(&self, scores: &[f32], mut f: impl FnMut(u32, f32)) {
        if self.all {
            for (i, &s) in scores.iter().enumerate() {
                f(i as u32, s);
            }
        } else {
            for &id in &self.ids {
                f(id, scores[id as usize]);
            }
        }
    }

    /// Replaces "all ids" by the explicit list `0..vocab`.
    fn materialize(&mut self, vocab: usize) {
        if self.all {
            self.ids.clear();
            self.ids.extend((0..vocab).map(|i| i as u32));
            self.all = false;
        }
    }

    /// Makes `next` the candidate list, keeping the old list's buffer as scratch.
    fn install(&mut self, next: Vec<u32>, sorted: bool) {
        self.spare = mem::replace(&mut self.ids, next);
        self.all = false;
        self.sorted = sorted;
    }

    /// Largest score among the allowed ids.
    fn max_score(&self, scores: &[f32]) -> f32 {
        if self.all {
            max_of(scores)
        } else {
            let it = self.ids.iter().map(|&i| scores[i as usize]);
            it.fold(f32::NEG_INFINITY, f32::max)
        }
    }

    /// `Σ e^(score - shift)` over the allowed ids.
    fn sum_exp(&self, scores: &[f32], shift: f32) -> f64 {
        if self.all {
            sum_exp(scores, shift)
        } else {
            let it = self.ids.iter();
            it.map(|&i| f64::from(fast_exp(scores[i as usize] - shift)))
                .sum()
        }
    }

    /// `ln Σ e^score` over the allowed ids: the log normaliser of their distribution.
    pub(crate) fn log_normalizer(&self, scores: &[f32]) -> f32 {
        if self.all {
            return log_sum_exp(scores);
        }
        let max = self.max_score(scores);
        if max == f32::NEG_INFINITY {
            return max;
        }
        max + self.sum_exp(scores, max).ln() as f32
    }

    /// HF `TopKLogitsWarper`: keeps the ids whose score is at least the `k`-th largest (so
    /// ties at the threshold all stay, as in HF). `k = 0` or `k >= len` keeps everything.
    pub(crate) fn top_k(&mut self, scores: &[f32], k: usize) {
        if k == 0 || k >= self.len(scores.len()) {
            return;
        }
        let threshold = if self.all && k <= SCAN_LIMIT {
            let items = scores.iter().enumerate().map(|(i, &s)| (i as u32, s));
            best_n(items, k, &mut self.best);
            self.best.last().map_or(f32::NEG_INFINITY, |b| b.1)
        } else {
            self.materialize(scores.len());
            self.ids
                .select_nth_unstable_by(k - 1, by_score_desc(scores));
            scores[self.ids[k - 1] as usize]
        };
        let mut next = mem::take(&mut self.spare);
        next.clear();
        self.for_each(scores, |id, s| {
            if s >= threshold {
                next.push(id);
            }
        });
        self.install(next, false);
    }

    /// HF `TopPLogitsWarper`: in descending order of probability (renormalised over the
    /// allowed ids), keeps each token while the mass of the tokens before it is below `top_p`
    /// — the smallest prefix whose mass reaches `top_p`, and at least one token. HF removes a
    /// token when the ascending cumulative sum up to it is `<= 1 - top_p`, the same set in
    /// exact arithmetic; only float rounding at an exact boundary can tell them apart.
    pub(crate) fn top_p(&mut self, scores: &[f32], top_p: f32) {
        if top_p >= 1.0 || self.len(scores.len()) == 0 {
            return;
        }
        let max = self.max_score(scores);
        let log_z = self.log_normalizer(scores);
        let target = f64::from(top_p);
        let mut mass = 0.0f64;
        let band_key = |s: f32| max - s;
        self.visit_banded(scores, band_key, by_score_desc(scores), false, |id| {
            mass += f64::from(fast_exp(scores[id as usize] - log_z));
            mass < target
        });
        self.sorted = true;
    }

    /// HF `TypicalLogitsWarper`: with `H` the entropy of the (renormalised) distribution over
    /// the allowed ids, orders them by `|-log p - H|` ascending, finds the first position where
    /// the cumulative probability reaches `mass`, and keeps every id whose distance to `H` is at
    /// most the distance at that position (ties included, at least one id).
    pub(crate) fn typical_p(&mut self, scores: &[f32], mass: f32) {
        if mass >= 1.0 || self.len(scores.len()) == 0 {
            return;
        }
        let log_z = self.log_normalizer(scores);
        // H = -Σ p ln p; tokens with p = 0 contribute nothing (HF's `nansum`).
        let entropy = if self.all {
            -sum_p_log_p(scores, log_z) as f32
        } else {
            let mut plogp = 0.0f64;
            self.for_each(scores, |_, s| plogp += p_log_p(s - log_z));
            -plogp as f32
        };
        let key = |s: f32| ((log_z - s) - entropy).abs();
        let cmp = |a: &u32, b: &u32| {
            key(scores[*a as usize])
                .partial_cmp(&key(scores[*b as usize]))
                .unwrap_or(Ordering::Equal)
                .then(a.cmp(b))
        };
        let target = f64::from(mass);
        let mut cumulative = 0.0f64;
        self.visit_banded(scores, key, cmp, true, |id| {
            cumulative += f64::from(fast_exp(scores[id as usize] - log_z));
            cumulative < target
        });
        self.sorted = false;
    }

    /// Visits the allowed ids in `cmp` order until `visit` returns `false`, and keeps exactly
    /// the visited ones — plus, with `keep_ties`, every id whose key equals the last visited
    /// one's. `band_key` maps a score to a key that must be non-decreasing along `cmp` order;
    /// the ids are split into [`BANDS`] of it by linear scans, so only the bands reached are
    /// ever ordered.
    fn visit_banded<K, C, V>(
        &mut self,
        scores: &[f32],
        band_key: K,
        cmp: C,
        keep_ties: bool,
        mut visit: V,
    ) where
        K: Fn(f32) -> f32,
        C: Fn(&u32, &u32) -> Ordering + Copy,
        V: FnMut(u32) -> bool,
    {
        let mut next = mem::take(&mut self.spare);
        next.clear();
        let mut band = mem::take(&mut self.band);
        let mut lower = f32::NEG_INFINITY;
        for upper in BANDS {
            band.clear();
            let last_band = upper == f32::INFINITY;
            self.for_each(scores, |id, s| {
                let k = band_key(s);
                if k >= lower && (last_band || k < upper) {
                    band.push(id);
                }
            });
            if let Some(n) = visit_in_order(&mut band, cmp, &mut visit) {
                next.extend_from_slice(&band[..n]);
                if keep_ties {
                    let edge = band_key(scores[band[n - 1] as usize]);
                    let ties = band[n..]
                        .iter()
                        .filter(|&&id| band_key(scores[id as usize]) <= edge);
                    next.extend(ties);
                }
                break;
            }
            next.extend_from_slice(&band);
            lower = upper;
        }
        self.band = band;
        self.install(next, false);
    }

    /// The `n` most likely allowed ids with their log-probabilities `score - log_z`, most
    /// likely first (ties: lower id first); fewer when fewer ids are allowed.
    pub(crate) fn top_n(&mut self, scores: &[f32], n: usize, log_z: f32) -> Vec<(u32, f32)> {
        let n = n.min(self.len(scores.len()));
        if n == 0 {
            return Vec::new();
        }
        if self.all && n <= SCAN_LIMIT {
            let items = scores.iter().enumerate().map(|(i, &s)| (i as u32, s));
            best_n(items, n, &mut self.best);
            return self.best.iter().map(|&(id, s)| (id, s - log_z)).collect();
        }
        self.materialize(scores.len());
        if !self.sorted {
            let cmp = by_score_desc(scores);
            if n < self.ids.len() {
                self.ids.select_nth_unstable_by(n - 1, cmp);
            }
            self.ids[..n].sort_unstable_by(cmp);
        }
        let top = self.ids[..n].iter();
        top.map(|&id| (id, scores[id as usize] - log_z)).collect()
    }

    /// Draws an allowed id with probability `e^score / Σ e^score`, by inverting the cumulative
    /// distribution (in the candidates' current order) at `u` in `[0, 1)`; returns it with the
    /// log normaliser of the distribution. `None` only when no id is allowed.
    pub(crate) fn sample(&self, scores: &[f32], u: f64) -> Option<(u32, f32)> {
        let max = self.max_score(scores);
        let total = self.sum_exp(scores, max);
        let log_z = max + total.ln() as f32;
        let target = u * total;
        let id = if self.all {
            walk_blocks(scores, max, target)
        } else {
            let items = self.ids.iter().map(|&i| (i, scores[i as usize]));
            walk(items, max, target)
        }?;
        Some((id, log_z))
    }
}

#[cfg(test)]
#[path = "candidates_tests.rs"]
mod tests;
