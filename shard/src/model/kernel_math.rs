//! Single-threaded f32 building blocks of the CPU attention kernels: dot products and sums in 8
//! partial sums, maxima in 16, and a vectorisable exponential.

/// `Σ a[i] b[i]` in 8 partial sums (vectorisable without reassociation flags).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `Σ a[i]` in 8 partial sums (the order [`exp2_shifted_sum`] sums in; its test's reference).
#[cfg(test)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `start` and the values of `a`, in 16 partial maxima: a single running max is
/// one dependent chain (a compare's latency per value), which held a 128-key tile's row to a
/// fraction of the vector units. `f32::max` ignores NaN operands, so the order does not matter.
#[inline(always)]
pub(crate) fn max(start: f32, a: &[f32]) -> f32 {
    let mut acc = [start; 16];
    let chunks = a.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(start, |m, &x| m.max(x));
    for x in chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(x[i]);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// How the exponential's polynomial multiplies and adds: fused where the caller is compiled
/// with FMA ([`Fused`]: one instruction per step, about a third fewer operations per
/// exponential), separately elsewhere ([`Unfused`]: `f32::mul_add` without the instruction is a
/// slow library call).
pub(crate) trait MulAdd: Copy {
    /// `a · b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// Fused multiply-add, rounded once (for code compiled with FMA).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Fused;

/// A product then a sum, each rounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `x = 2^(x - shift)` over a slice, returning the sum of the results in the 8 partial sums of
/// [`sum`] (a loop the compiler vectorises): the softmax of scores kept in base 2
/// (`(q · k) · scale · log2(e)`), whose exponential is [`exp2_approx`], about two thirds of
/// [`exp_approx`]'s operations (in-process pairs on the attention bench, AVX2: 5-8% faster
/// prefill attention than `e^x` on natural-log scores).
#[inline(always)]
pub(crate) fn exp2_shifted_sum<M: MulAdd>(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for x in &mut chunks {
        for i in 0..8 {
            x[i] = exp2_approx::<M>(x[i] - shift);
            acc[i] += x[i];
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|x| {
            *x = exp2_approx::<M>(*x - shift);
            *x
        })
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `2^x` within ~2 ulp for `x ≤ 127`, branch-free so that loops over it vectorise; for softmax
/// arguments (`x ≤ 0`), which need no upper clamp. `x` below -126 counts as -126 (the result
/// stays a normal number, ~1e-38, never 0), NaN stays NaN. `x = n + f` with `n` the nearest
/// integer and `|f| ≤ 1/2` (exact: no range reduction by a rounded `ln 2`), Cephes' degree-6
/// polynomial for `2^f` (Horner steps by `M`), and `2^n` built from its exponent bits.
#[inline(always)]
pub(crate) fn exp2_approx<M: MulAdd>(x: f32) -> f32 {
    // Not `f32::max`, which would turn NaN into -126.
    let x = if x < -126.0 { -126.0 } else { x };
    let t = x + ROUND;
    let f = x - (t - ROUND);
    let mut p = 1.535_336_2e-4_f32;
    p = M::mul_add(p, f, 1.339_887_4e-3);
    p = M::mul_add(p, f, 9.618_437e-3);
    p = M::mul_add(p, f, 5.550_332_5e-2);
    p = M::mul_add(p, f, 2.402_264_8e-1);
    p = M::mul_add(p, f, 6.931_472e-1);
    times_pow2(M::mul_add(p, f, 1.0), t)
}

/// 1.5 · 2^23: adding it to `x` (|x| < 2^22) rounds to an integer kept in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `y · 2^n` for `t = n + ROUND` (`-126 ≤ n ≤ 127`, so `t` lies in [2^23, 2^24) and its bits
/// are those of ROUND plus `n`), `2^n` built from its exponent bits.
#[inline(always)]
fn times_pow2(y: f32, t: f32) -> f32 {
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((n + 127) << 23) as u32)
}

/// `e^x` within ~2 ulp of `expf` for `x` in `[-87.3, 88.3]` (clamped outside, so it never
/// overflows and underflows to ~1e-38 rather than 0), branch-free so that loops over it
/// vectorise: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-6 polynomial for `e^r`
/// (Horner steps by `M`), and `2^n` built from its exponent bits.
#[inline(always)]
pub(crate) fn exp_approx<M: MulAdd>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 0.5);
    times_pow2(M::mul_add(p, r * r, r) + 1.0, t)
}

#[cfg(test)]
mod tests {
    use super::{Fused, MulAdd, Unfused, exp_approx, exp2_approx, exp2_shifted_sum, max, sum};

    /// The partial maxima give the single chain's answer for every length around the chunk
    /// size, with the largest value anywhere, and skip NaNs as `f32::max` does.
    #[test]
    fn max_matches_a_running_max() {
        for len in 0..50 {
            for at in 0..len {
                let mut v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
                v[at] = 3.0 + at as f32;
                let want = v.iter().fold(-1.5f32, |m, &x| m.max(x));
                assert_eq!(max(-1.5, &v), want, "len {len} at {at}");
                if len > 1 {
                    v[(at + 1) % len] = f32::NAN;
                    assert_eq!(max(-1.5, &v), 3.0 + at as f32, "NaN, len {len} at {at}");
                }
            }
            assert_eq!(max(7.0, &vec![1.0; len]), 7.0);
        }
    }

    /// The largest relative error of `f` against the f64 `want` at 400,001 evenly spaced points
    /// of `range`.
    fn worst_relative_error(
        range: std::ops::RangeInclusive<f32>,
        f: impl Fn(f32) -> f32,
        want: impl Fn(f64) -> f64,
    ) -> f64 {
        const STEPS: usize = 400_000;
        let (lo, hi) = range.into_inner();
        (0..=STEPS)
            .map(|i| lo + (hi - lo) * i as f32 / STEPS as f32)
            .map(|x| {
                let w = want(x as f64);
                ((f(x) as f64) - w).abs() / w
            })
            .fold(0.0, f64::max)
    }

    /// The polynomial exponential against f64 `exp`, relative error within 3 ulp, with the
    /// Horner steps fused and not.
    #[test]
    fn exp_approx_is_accurate() {
        fn check<M: MulAdd>() {
            let worst = worst_relative_error(-87.0..=88.0, exp_approx::<M>, f64::exp);
            assert!(worst < 3.0 * f32::EPSILON as f64, "{worst}");
            assert_eq!(exp_approx::<M>(0.0), 1.0);
            assert!(exp_approx::<M>(f32::NEG_INFINITY) < 1e-37);
            assert!(exp_approx::<M>(f32::NAN).is_nan());
        }
        check::<Fused>();
        check::<Unfused>();
    }

    /// The base-2 pass gives [`exp2_approx`]'s values and [`sum`]'s total of them, bit for bit.
    #[test]
    fn exp2_shifted_sum_matches_exp2_then_sum() {
        for len in 0..40 {
            let xs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.61).cos() * 9.0).collect();
            let shift = max(f32::NEG_INFINITY, &xs);
            let want: Vec<f32> = xs.iter().map(|x| exp2_approx::<Fused>(x - shift)).collect();
            let mut got = xs.clone();
            let total = exp2_shifted_sum::<Fused>(&mut got, shift);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "len {len}"
            );
            assert_eq!(total.to_bits(), sum(&want).to_bits(), "len {len}");
        }
    }

    /// The base-2 exponential against f64 `exp2`, relative error within 3 ulp over the softmax
    /// range and up to 127, with the Horner steps fused and not; below -126 it stays at 2^-126.
    #[test]
    fn exp2_approx_is_accurate() {
        fn check<M: MulAdd>() {
            let worst = worst_relative_error(-126.0..=127.0, exp2_approx::<M>, f64::exp2);
            assert!(worst < 3.0 * f32::EPSILON as f64, "{worst}");
            for n in -126..=127 {
                assert_eq!(exp2_approx::<M>(n as f32), (n as f32).exp2(), "2^{n}");
            }
            assert_eq!(exp2_approx::<M>(-1e9), 2f32.powi(-126));
            assert_eq!(exp2_approx::<M>(f32::NEG_INFINITY), 2f32.powi(-126));
            assert!(exp2_approx::<M>(f32::NAN).is_nan());
        }
        check::<Fused>();
        check::<Unfused>();
    }
}
