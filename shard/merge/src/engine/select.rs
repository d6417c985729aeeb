//! Top-k by magnitude without sorting or copying: a three-level radix select on the bit patterns
//! of `|x|` (for non-negative finite floats the bit pattern orders like the value).
//!
//! The result is a [`KeepRule`]: keep every element whose magnitude is above the k-th largest,
//! plus the first (lowest flat index) elements equal to it until exactly k are kept. This is the
//! "stable descending sort, prefer the lower index" tie-break, and it can be applied in one
//! streaming pass in flat order (branch-free unless tied magnitudes straddle the boundary).
//!
//! The threshold is found in one pass in the common case ([`select_slice`]: a sample brackets the
//! k-th magnitude, one pass gathers the bracket, an exact select finishes) and falls back to an
//! exact radix select of at most three passes (one histogram of 4096 buckets per level,
//! 12 + 12 + 7 bits). Both work on chunks fed in any order, so they also apply to data generated
//! block by block and never stored (the full deltas of the SVD family).

/// Mask of the magnitude bits of an `f32` (everything but the sign).
const MAG: u32 = 0x7fff_ffff;

/// `(shift, width)` of the three radix levels over the 31 magnitude bits.
const LEVELS: [(u32, u32); 3] = [(19, 12), (7, 12), (0, 7)];

/// Which elements survive magnitude pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeepRule {
    /// Keep everything.
    All,
    /// Keep nothing.
    None,
    /// Keep magnitudes (as bits) above `threshold`, plus the first `equal_quota` of the
    /// `equal_count` elements (in flat order) whose magnitude bits equal `threshold`.
    Above {
        threshold: u32,
        equal_quota: usize,
        equal_count: usize,
    },
}

impl KeepRule {
    /// Whether applying the rule depends on the flat order of the elements (it keeps some but
    /// not all of the elements tied at the threshold).
    pub(crate) fn depends_on_order(&self) -> bool {
        matches!(*self, KeepRule::Above { equal_quota, equal_count, .. } if equal_quota > 0 && equal_quota < equal_count)
    }
}

/// `floor(density * len)`, capped at `len`: PEFT's `int(density * numel)`.
pub(crate) fn keep_count(density: f64, len: usize) -> usize {
    let k = (density * len as f64).floor();
    if k <= 0.0 { 0 } else { (k as usize).min(len) }
}

/// A radix select in progress: feed every element once per pass, then call
/// [`finish_pass`](Self::finish_pass) until it yields the rule.
pub(crate) struct RadixSelect {
    /// Elements still needed among those matching `prefix`.
    need: usize,
    /// Magnitude bits fixed by the previous levels.
    prefix: u32,
    level: usize,
    hist: Vec<usize>,
}

impl RadixSelect {
    /// Starts selecting the `k` largest magnitudes among `len` elements; returns the rule
    /// directly when no pass is needed.
    pub(crate) fn new(k: usize, len: usize) -> Result<Self, KeepRule> {
        if k == 0 {
            return Err(KeepRule::None);
        }
        if k >= len {
            return Err(KeepRule::All);
        }
        Ok(Self {
            need: k,
            prefix: 0,
            level: 0,
            hist: vec![0; 1 << LEVELS[0].1],
        })
    }

    /// Adds a chunk of the data (in any order) to the current pass.
    pub(crate) fn feed(&mut self, xs: &[f32]) {
        let (shift, width) = LEVELS[self.level];
        let hi_shift = shift + width;
        let mask = (1u32 << width) - 1;
        let prefix = self.prefix;
        let hist = &mut self.hist;
        if hi_shift >= 31 {
            for &x in xs {
                let b = x.to_bits() & MAG;
                hist[(b >> shift) as usize] += 1;
            }
        } else {
            for &x in xs {
                let b = x.to_bits() & MAG;
                if b >> hi_shift == prefix {
                    hist[((b >> shift) & mask) as usize] += 1;
                }
            }
        }
    }

    /// Ends a pass: returns the rule, or `None` when another pass over all the data is needed.
    pub(crate) fn finish_pass(&mut self) -> Option<KeepRule> {
        let (shift, width) = LEVELS[self.level];
        let mut above = 0usize;
        let mut chosen = 0usize;
        let mut in_bucket = 0usize;
        for (bucket, &count) in self.hist.iter().enumerate().rev() {
            if above + count >= self.need {
                chosen = bucket;
                in_bucket = count;
                break;
            }
            above += count;
        }
        let need = self.need - above;
        let prefix = (self.prefix << width) | chosen as u32;
        if in_bucket == need {
            // The whole bucket is kept: keep every magnitude >= its lower bound.
            let lower = prefix << shift;
            return Some(if lower == 0 {
                KeepRule::All
            } else {
                KeepRule::Above {
                    threshold: lower - 1,
                    equal_quota: 0,
                    equal_count: 0,
                }
            });
        }
        self.need = need;
        self.prefix = prefix;
        self.level += 1;
        if self.level == LEVELS.len() {
            return Some(KeepRule::Above {
                threshold: prefix,
                equal_quota: need,
                equal_count: in_bucket,
            });
        }
        self.hist.clear();
        self.hist.resize(1 << LEVELS[self.level].1, 0);
        None
    }
}

/// Below this many elements a slice is selected exactly without sampling.
const SMALL: usize = 4096;

/// The rule keeping the `k` largest magnitudes of `xs`.
///
/// A strided sample brackets the k-th largest magnitude between two sample order statistics
/// (4 standard deviations of the sample rank apart); one pass counts the elements above the
/// bracket and gathers those inside it (a few percent), and an exact selection among the
/// gathered ones gives the threshold. If the bracket misses (probability ~1e-4) the exact
/// three-pass radix select is used instead, so the result never depends on the sample.
pub(crate) fn select_slice(xs: &[f32], k: usize) -> KeepRule {
    let sel = match RadixSelect::new(k, xs.len()) {
        Err(rule) => return rule,
        Ok(sel) => sel,
    };
    let bounds = if xs.len() <= SMALL {
        Bracket::EVERYTHING
    } else {
        let n = (xs.len() / 16).clamp(256, 2048);
        let stride = xs.len() / n;
        let mut sample: Vec<u32> = (0..n).map(|i| xs[i * stride].to_bits() & MAG).collect();
        Bracket::from_sample(&mut sample, k, xs.len())
    };
    let mut range = RangeSelect::new(bounds);
    range.feed(xs);
    range.finish(k).unwrap_or_else(|| radix_slice(sel, xs))
}

/// The exact three-pass radix select over a slice.
fn radix_slice(mut sel: RadixSelect, xs: &[f32]) -> KeepRule {
    loop {
        sel.feed(xs);
        if let Some(rule) = sel.finish_pass() {
            return rule;
        }
    }
}

/// An interval `[lo, hi]` of magnitude bits expected to contain the k-th largest magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bracket {
    lo: u32,
    hi: u32,
}

impl Bracket {
    /// The interval containing every magnitude.
    pub(crate) const EVERYTHING: Bracket = Bracket {
        lo: 0,
        hi: u32::MAX,
    };

    /// Brackets the k-th largest of `len` magnitudes from a sample of their bit patterns (the
    /// sample is reordered).
    pub(crate) fn from_sample(sample: &mut [u32], k: usize, len: usize) -> Bracket {
        let s = sample.len();
        if s == 0 {
            return Bracket::EVERYTHING;
        }
        let p = k as f64 / len as f64;
        let margin = 4.0 * (p * (1.0 - p) * s as f64).sqrt() + 2.0;
        let center = p * s as f64;
        // Ranks counted from the largest (0 = largest).
        let r_hi = center - margin;
        let r_lo = center + margin;
        let hi = if r_hi < 0.0 {
            u32::MAX
        } else {
            *sample
                .select_nth_unstable_by(r_hi as usize, |a, b| b.cmp(a))
                .1
        };
        let lo = if r_lo >= (s - 1) as f64 {
            0
        } else {
            *sample
                .select_nth_unstable_by(r_lo.ceil() as usize, |a, b| b.cmp(a))
                .1
        };
        Bracket { lo, hi }
    }
}

/// One pass of the sampled select: counts magnitudes above the bracket and gathers those in it.
pub(crate) struct RangeSelect {
    bracket: Bracket,
    above: usize,
    inside: Vec<u32>,
}

impl RangeSelect {
    /// A pass for the given bracket.
    pub(crate) fn new(bracket: Bracket) -> Self {
        Self {
            bracket,
            above: 0,
            inside: Vec::new(),
        }
    }

    /// Adds a chunk of the data (in any order).
    pub(crate) fn feed(&mut self, xs: &[f32]) {
        const STAGE: usize = 256;
        let Bracket { lo, hi } = self.bracket;
        let mut stage = [0u32; STAGE];
        let mut above = 0usize;
        for chunk in xs.chunks(STAGE) {
            // Branch-free compaction into the stage: write every element, advance only over
            // those inside the bracket.
            let mut n = 0usize;
            for &x in chunk {
                let b = x.to_bits() & MAG;
                above += usize::from(b > hi);
                stage[n & (STAGE - 1)] = b;
                n += usize::from(b >= lo && b <= hi);
            }
            self.inside.extend_from_slice(&stage[..n.min(STAGE)]);
        }
        self.above += above;
    }

    /// The rule, or `None` if the k-th largest magnitude was not inside the bracket.
    pub(crate) fn finish(mut self, k: usize) -> Option<KeepRule> {
        if self.above >= k || k - self.above > self.inside.len() {
            return None;
        }
        let need = k - self.above;
        let (_, &mut threshold, _) = self
            .inside
            .select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
        let greater = self.inside.iter().filter(|&&b| b > threshold).count();
        let equal_count = self.inside.iter().filter(|&&b| b == threshold).count();
        Some(KeepRule::Above {
            threshold,
            equal_quota: need - greater,
            equal_count,
        })
    }
}

/// How a [`MagnitudeMask`] decides, chosen so the common cases are branch-free.
#[derive(Debug, Clone, Copy)]
enum Mode {
    All,
    None,
    /// Keep bits > threshold.
    Strict(u32),
    /// Keep bits >= threshold.
    Inclusive(u32),
    /// Keep bits > threshold and the next `left` elements equal to it.
    Sequential {
        threshold: u32,
        left: usize,
    },
}

/// Applies a [`KeepRule`] in flat order, possibly over several consecutive chunks.
pub(crate) struct MagnitudeMask {
    mode: Mode,
}

impl MagnitudeMask {
    /// A mask applying `rule` from the first element.
    pub(crate) fn new(rule: KeepRule) -> Self {
        let mode = match rule {
            KeepRule::All => Mode::All,
            KeepRule::None => Mode::None,
            KeepRule::Above {
                threshold,
                equal_quota: 0,
                ..
            } => Mode::Strict(threshold),
            KeepRule::Above {
                threshold,
                equal_quota,
                equal_count,
            } if equal_quota >= equal_count => Mode::Inclusive(threshold),
            KeepRule::Above {
                threshold,
                equal_quota,
                ..
            } => Mode::Sequential {
                threshold,
                left: equal_quota,
            },
        };
        Self { mode }
    }

    /// Writes the kept values of the next chunk `src` to `dst` (zero elsewhere).
    pub(crate) fn apply(&mut self, src: &[f32], dst: &mut [f32]) {
        match &mut self.mode {
            Mode::All => dst.copy_from_slice(src),
            Mode::None => dst.fill(0.0),
            // Branch-free, as PEFT's `tensor * mask`.
            Mode::Strict(t) => {
                let t = *t;
                for (d, &x) in dst.iter_mut().zip(src) {
                    let mask = if x.to_bits() & MAG > t { 1.0f32 } else { 0.0 };
                    *d = x * mask;
                }
            }
            Mode::Inclusive(t) => {
                let t = *t;
                for (d, &x) in dst.iter_mut().zip(src) {
                    let mask = if x.to_bits() & MAG >= t { 1.0f32 } else { 0.0 };
                    *d = x * mask;
                }
            }
            Mode::Sequential { threshold, left } => {
                let t = *threshold;
                for (d, &x) in dst.iter_mut().zip(src) {
                    let b = x.to_bits() & MAG;
                    *d = if b > t {
                        x
                    } else if b == t && *left > 0 {
                        *left -= 1;
                        x
                    } else {
                        0.0
                    };
                }
                if *left == 0 {
                    self.mode = Mode::Strict(t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: stable sort of indices by descending |x|, keep the first k.
    fn reference(xs: &[f32], k: usize) -> Vec<f32> {
        let mut idx: Vec<usize> = (0..xs.len()).collect();
        idx.sort_by(|&a, &b| xs[b].abs().total_cmp(&xs[a].abs()).then(a.cmp(&b)));
        let mut out = vec![0.0; xs.len()];
        for &i in &idx[..k] {
            out[i] = xs[i];
        }
        out
    }

    fn prune(xs: &[f32], k: usize) -> Vec<f32> {
        let mut out = vec![0.0; xs.len()];
        let mut mask = MagnitudeMask::new(select_slice(xs, k));
        // Apply in uneven chunks to exercise the streaming state.
        let mut start = 0;
        for (i, len) in [3usize, 1, 7, 64].iter().cycle().enumerate() {
            if start >= xs.len() {
                break;
            }
            let end = (start + len + i % 2).min(xs.len());
            mask.apply(&xs[start..end], &mut out[start..end]);
            start = end;
        }
        out
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn matches_stable_sort_on_random_data() {
        let mut s = 42u64;
        for len in [1usize, 2, 5, 100, 1000, 4097, 50_000] {
            let xs: Vec<f32> = (0..len).map(|_| lcg(&mut s) * 3.0).collect();
            for k in [0, 1, len / 3, len / 2, len.saturating_sub(1), len] {
                assert_eq!(prune(&xs, k), reference(&xs, k), "len {len} k {k}");
            }
        }
    }

    #[test]
    fn ties_prefer_lower_index() {
        // Many equal magnitudes (bf16-like coarse values) with mixed signs and zeros.
        let mut s = 7u64;
        for len in [3000usize, 30_000] {
            let xs: Vec<f32> = (0..len)
                .map(|_| (lcg(&mut s) * 16.0).round() / 4.0)
                .collect();
            for k in [1, 10, len / 6, len / 2, len / 2 + 1, len - 1] {
                assert_eq!(prune(&xs, k), reference(&xs, k), "len {len} k {k}");
            }
        }
        let same = vec![-0.5f32; 10];
        assert_eq!(prune(&same, 4), reference(&same, 4));
    }

    #[test]
    fn streaming_radix_select_matches() {
        // The three-level select fed in chunks (as the SVD family does with generated blocks).
        let mut s = 99u64;
        for len in [10usize, 3000, 70_000] {
            let xs: Vec<f32> = (0..len)
                .map(|_| (lcg(&mut s) * 64.0).round() / 64.0)
                .collect();
            for k in [1, len / 7, len / 2, len - 1] {
                let rule = match RadixSelect::new(k, len) {
                    Err(rule) => rule,
                    Ok(mut sel) => loop {
                        for c in xs.chunks(997) {
                            sel.feed(c);
                        }
                        if let Some(rule) = sel.finish_pass() {
                            break rule;
                        }
                    },
                };
                let mut out = vec![0.0; len];
                MagnitudeMask::new(rule).apply(&xs, &mut out);
                assert_eq!(out, reference(&xs, k), "len {len} k {k}");
                assert_eq!(out, prune(&xs, k), "len {len} k {k}");
            }
        }
    }

    #[test]
    fn bracket_misses_fall_back() {
        let xs: Vec<f32> = (0..100).map(|i| i as f32).collect();
        // A bracket far above the 10th largest: RangeSelect refuses, the radix select answers.
        let mut r = RangeSelect::new(Bracket {
            lo: 200f32.to_bits(),
            hi: 300f32.to_bits(),
        });
        r.feed(&xs);
        assert!(r.finish(10).is_none());
        let mut r = RangeSelect::new(Bracket {
            lo: 0,
            hi: 5f32.to_bits(),
        });
        r.feed(&xs);
        assert!(r.finish(10).is_none());
        let mut r = RangeSelect::new(Bracket {
            lo: 85f32.to_bits(),
            hi: 95f32.to_bits(),
        });
        r.feed(&xs);
        let rule = r.finish(10).unwrap();
        assert_eq!(
            rule,
            KeepRule::Above {
                threshold: 90f32.to_bits(),
                equal_quota: 1,
                equal_count: 1
            }
        );
    }

    #[test]
    fn keep_count_matches_python_int() {
        assert_eq!(keep_count(0.5, 6), 3);
        assert_eq!(keep_count(0.7, 10), 7); // 0.7 * 10 rounds to exactly 7.0 in f64, as in Python
        assert_eq!(keep_count(f64::from(0.7f32), 10), 6); // LoRAX: density passed through f32
        assert_eq!(keep_count(0.0, 10), 0);
        assert_eq!(keep_count(1.0, 10), 10);
    }

    #[test]
    fn section_four_prune_vector() {
        // merge-semantics.md §4: A1 at d = 0.5 keeps 3 of 6.
        let a1 = [0.9f32, -0.1, 0.4, -0.5, 0.2, 0.05];
        assert_eq!(
            prune(&a1, keep_count(0.5, 6)),
            vec![0.9, 0.0, 0.4, -0.5, 0.0, 0.0]
        );
    }
}
