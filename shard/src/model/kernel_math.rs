//! Single-threaded f32 building blocks of the CPU attention kernels: a strided matrix product,
//! dot products and sums in 8 partial sums, and a vectorisable exponential.

use medley_kernels::matmul::{Isa, Strided, Update, gemm_small};

/// Whether a `[rows, cols]` view lies inside its data (both positive).
fn fits(m: &Strided<'_>, rows: usize, cols: usize) -> bool {
    (rows - 1) * m.rs + (cols - 1) * m.cs < m.data.len()
}

/// `dst = update(a · b)` for `[m, n, k]` = `dims`, `a: [m, k]`, `b: [k, n]`, `dst: [m, n]` with
/// row stride `dst_rs`, single-threaded (the tasks are the parallel loop): the packed AVX-512 /
/// AVX2 micro-kernels of `medley_kernels` where the CPU has them, else the `gemm` crate.
pub(crate) fn matmul(
    dst: &mut [f32],
    dims: [usize; 3],
    dst_rs: usize,
    update: Update,
    a: Strided<'_>,
    b: Strided<'_>,
) {
    let [m, n, k] = dims;
    let inside = m > 0
        && n > 0
        && k > 0
        && n <= dst_rs
        && (m - 1) * dst_rs + n <= dst.len()
        && fits(&a, m, k)
        && fits(&b, k, n);
    // An invariant of the callers (tile sizes are fixed by construction), checked for soundness.
    assert!(inside, "paged attention: matmul {dims:?} out of bounds");
    let isa = Isa::detect();
    if isa != Isa::Portable {
        gemm_small(isa, dims, a, b, dst, dst_rs, update)
            .expect("paged attention: operands checked above");
        return;
    }
    let (accumulate, alpha, beta) = match update {
        Update::Store => (false, 0.0, 1.0),
        Update::Scale(beta) => (false, 0.0, beta),
        Update::Accumulate => (true, 1.0, 1.0),
    };
    // SAFETY: every element gemm reads or writes lies inside the slices (checked above); `dst`
    // is a unique borrow, so it overlaps neither `a` nor `b`; the strides fit in isize since
    // they index allocated slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

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

/// `Σ a[i]` in 8 partial sums.
#[inline(always)]
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

/// `x = exp(x - shift)` over a slice (a loop the compiler vectorises).
#[inline(always)]
pub(crate) fn exp_shifted(xs: &mut [f32], shift: f32) {
    xs.iter_mut().for_each(|x| *x = exp_approx(*x - shift));
}

/// `e^x` within ~2 ulp of `expf` for `x` in `[-87.3, 88.3]` (clamped outside, so it never
/// overflows and underflows to ~1e-38 rather than 0), branch-free so that loops over it
/// vectorise: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-6 polynomial for `e^r`, and
/// `2^n` built from its exponent bits.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    /// 1.5 · 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `t`'s bits are those of ROUND plus n (|n| ≤ 127 keeps it in [2^23, 2^24)).
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::exp_approx;

    /// The polynomial exponential against f64 `exp`, relative error within 3 ulp.
    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_approx(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "{worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_approx(f32::NAN).is_nan());
    }
}
