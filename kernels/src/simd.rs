//! The two inner loops of the CPU kernels — several dot products against one shared vector, and
//! `y += alpha · x` — compiled twice: with AVX2 + FMA (chosen at run time when the CPU has them)
//! and portable (whatever the build target allows, with separate multiply and add).

/// Multiply-add flavour of a loop body.
trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` with one rounding (only used where FMA instructions are enabled).
struct Fused;

impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `a · b + c` with two roundings.
struct Plain;

impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Lanes per accumulator (one AVX register of f32).
const LANES: usize = 8;

/// `out[r] = a · xs[r]` for `R` vectors of `a.len()` values, reading `a` once.
#[inline(always)]
fn dots_body<M: Madd, const R: usize>(a: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let n = a.len();
    let mut acc = [[0f32; LANES]; R];
    let body = n - n % LANES;
    let a_chunks = a[..body].chunks_exact(LANES);
    let x_chunks: [_; R] = xs.map(|x| x[..body].chunks_exact(LANES));
    let mut x_iters = x_chunks;
    for av in a_chunks {
        for r in 0..R {
            if let Some(xv) = x_iters[r].next() {
                for k in 0..LANES {
                    acc[r][k] = M::madd(av[k], xv[k], acc[r][k]);
                }
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let tail: f32 = a[body..]
            .iter()
            .zip(&xs[r][body..n])
            .map(|(u, v)| u * v)
            .sum();
        out[r] = acc[r].iter().sum::<f32>() + tail;
    }
    out
}

#[inline(always)]
fn axpy_body<M: Madd>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = M::madd(alpha, v, *o);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dots<const R: usize>(a: &[f32], xs: [&[f32]; R]) -> [f32; R] {
        dots_body::<Fused, R>(a, xs)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        axpy_body::<Fused>(alpha, x, y)
    }

    /// Whether the CPU has AVX2 and FMA (checked once).
    pub(super) fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
}

/// `[a · xs[0], ..., a · xs[R-1]]`; every `xs[r]` must be at least as long as `a`.
pub(crate) fn dots<const R: usize>(a: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports AVX2 and FMA, checked at run time just above.
        return unsafe { x86::dots(a, xs) };
    }
    dots_body::<Plain, R>(a, xs)
}

/// `y += alpha · x` over the common length.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU supports AVX2 and FMA, checked at run time just above.
        return unsafe { x86::axpy(alpha, x, y) };
    }
    axpy_body::<Plain>(alpha, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_axpy_match_f64() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|r| (0..40).map(|i| ((i + r * 7) as f32 * 0.11).cos()).collect())
            .collect();
        let got = dots(&a, [&xs[0][..], &xs[1][..], &xs[2][..]]);
        for r in 0..3 {
            let want: f64 = a
                .iter()
                .zip(&xs[r])
                .map(|(u, v)| *u as f64 * *v as f64)
                .sum();
            // 37 products of values below 1: f32 accumulation error far below 1e-5.
            assert!(
                (got[r] as f64 - want).abs() < 1e-5,
                "{r}: {} vs {want}",
                got[r]
            );
            assert_eq!(got[r], dots(&a, [&xs[r][..]])[0], "same value alone");
        }
        let mut y = vec![1f32; 37];
        axpy(2.0, &a, &mut y);
        for (i, v) in y.iter().enumerate() {
            assert!((v - (1.0 + 2.0 * a[i])).abs() < 1e-6);
        }
        // Both flavours agree closely (FMA rounds once).
        let plain = dots_body::<Plain, 1>(&a, [&xs[0][..]])[0];
        assert!((plain - got[0]).abs() < 1e-5);
    }
}
