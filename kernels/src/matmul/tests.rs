//! `matmul_nt` against a naive f64 reference, for every instruction set this CPU has.

use super::*;
use crate::testing::values;

/// Every instruction set the test machine can run.
fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

/// `(x Wᵀ, |x| |W|ᵀ)` accumulated in f64.
fn reference(shape: Shape, x: &[f32], w: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    let mut y = vec![0f64; m * n];
    let mut abs = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            for i in 0..k {
                let p = x[r * k + i] as f64 * w[c * k + i] as f64;
                y[r * n + c] += p;
                abs[r * n + c] += p.abs();
            }
        }
    }
    (y, abs)
}

fn shape(rows: usize, in_features: usize, out_features: usize) -> Shape {
    Shape {
        rows,
        in_features,
        out_features,
    }
}

/// Runs the kernel on a NaN-filled `y`, so a missed output cannot pass.
fn run(isa: Isa, s: Shape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NAN; s.rows * s.out_features];
    matmul_nt_with(isa, s, x, w, &mut y).expect("kernel");
    y
}

/// Every output against the f64 reference. A sum of `K` products computed in f32 (in any order,
/// with or without FMA) differs from the exact sum by at most `γ_K · Σ|products|` with
/// `γ_K = K·u / (1 - K·u)`, `u = 2⁻²⁴` (Higham, *Accuracy and Stability of Numerical
/// Algorithms*, §3.1); `K · f32::EPSILON = 2K·u` bounds that for every `K` used here. The inputs
/// are exact in f32, so this is the whole error.
#[test]
fn matches_f64_reference_for_many_shapes() {
    let rows = [1, 2, 3, 7, 16, 33, 64, 65, 131, 192, 205];
    let nk = [
        (1, 1),
        (3, 5),
        (5, 17),
        (13, 31),
        (37, 100),
        (67, 257),
        (130, 1031),
    ];
    for isa in isas() {
        for (n, k) in nk {
            let w = values(n * k, 3 + n as u64);
            for m in rows {
                let s = shape(m, k, n);
                let x = values(m * k, 7 + m as u64);
                let (want, abs) = reference(s, &x, &w);
                for algo in [Algo::Streaming, Algo::Packed] {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_nt_algo(isa, algo, s, &x, &w, &mut got).expect("kernel");
                    for (i, g) in got.iter().enumerate() {
                        let bound = k as f64 * f32::EPSILON as f64 * abs[i];
                        assert!(
                            (*g as f64 - want[i]).abs() <= bound,
                            "{isa:?} {algo:?} m {m} n {n} k {k} out {i}: {g} vs {} (bound {bound})",
                            want[i]
                        );
                    }
                }
            }
        }
    }
}

/// Small integers make every partial sum exact, so any indexing slip (a tail element, a row
/// remainder, a `K` block, a parallel range boundary) shows as a mismatch; the case with
/// 64 × 3000 values of `x` (750 KiB) runs in two `K` blocks.
#[test]
fn integer_inputs_are_exact_across_blocks_and_threads() {
    let ints = |n: usize, seed: u64| -> Vec<f32> {
        values(n, seed)
            .into_iter()
            .map(|v| (v * 2.5).round())
            .collect()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("pool");
    let cases = [
        (48, 9, 3000),
        (5, 203, 1500),
        (16, 1001, 33),
        (1, 4099, 70),
        // The packed gemm (from `Isa::packed_min_rows`, at most 192 rows): `K` blocks, row and
        // column remainders, many tasks.
        (200, 37, 500),
        (193, 1001, 33),
        (777, 70, 200),
    ];
    for (m, n, k) in cases {
        let s = shape(m, k, n);
        assert!(
            m >= Isa::Avx512.packed_min_rows() || m * k * 4 <= X_BLOCK_BYTES || k_block(m, k) < k
        );
        let (x, w) = (ints(m * k, 1), ints(n * k, 2));
        let want: Vec<f32> = reference(s, &x, &w).0.iter().map(|v| *v as f32).collect();
        for isa in isas() {
            assert_eq!(run(isa, s, &x, &w), want, "{isa:?} {m}x{n}x{k}");
            let threaded = pool.install(|| run(isa, s, &x, &w));
            assert_eq!(threaded, want, "{isa:?} {m}x{n}x{k} on 3 threads");
        }
    }
}

/// The packed gemm sums each output as one chain in `k` order: a row's result is bit for bit the
/// same whatever other rows share the call, and on any number of threads (what makes a chunked
/// prefill equal an unchunked one).
#[test]
fn packed_rows_do_not_depend_on_the_call() {
    let (n, k) = (300, 700);
    let w = values(n * k, 5);
    let x = values(250 * k, 6);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("pool");
    let packed = |isa: Isa, m: usize, x: &[f32]| {
        let mut y = vec![f32::NAN; m * n];
        matmul_nt_algo(isa, Algo::Packed, shape(m, k, n), x, &w, &mut y).expect("kernel");
        y
    };
    for isa in isas().into_iter().filter(|i| *i != Isa::Portable) {
        let all = packed(isa, 250, &x);
        // Rows 90..250 alone, on 3 threads.
        let part = pool.install(|| packed(isa, 160, &x[90 * k..]));
        assert!(
            all[90 * n..]
                .iter()
                .zip(&part)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{isa:?}"
        );
    }
}

#[test]
fn edge_shapes_and_bad_buffers() {
    let isa = Isa::detect();
    assert!(isa.is_available());
    // K = 0: the empty sum.
    assert_eq!(run(isa, shape(2, 0, 3), &[], &[]), vec![0f32; 6]);
    // No rows or no outputs: nothing to do.
    matmul_nt(shape(0, 4, 3), &[], &[0.; 12], &mut []).expect("no rows");
    matmul_nt(shape(2, 4, 0), &[0.; 8], &[], &mut []).expect("no outputs");
    // Buffers too short for the shape are refused before anything is written.
    let mut y = vec![7f32; 6];
    for (x, w) in [
        (&[0f32; 7][..], &[0f32; 12][..]),
        (&[0f32; 8][..], &[0f32; 11][..]),
    ] {
        assert!(matches!(
            matmul_nt(shape(2, 4, 3), x, w, &mut y),
            Err(KernelError::BufferTooSmall { .. })
        ));
    }
    assert!(matches!(
        matmul_nt(shape(2, 4, 3), &[0.; 8], &[0.; 12], &mut y[..5]),
        Err(KernelError::BufferTooSmall { .. })
    ));
    assert_eq!(y, vec![7f32; 6]);
    // Longer buffers are fine: only the leading values are used.
    let mut y = vec![0f32; 4];
    matmul_nt(shape(1, 2, 2), &[1., 2., 9.], &[3., 4., 5., 6., 9.], &mut y).expect("long");
    assert_eq!(y, vec![11., 17., 0., 0.]);
}

#[test]
fn k_blocks_keep_x_in_l2() {
    assert_eq!(k_block(16, 2048), 2048);
    assert_eq!(k_block(64, 2048), 2048);
    let kb = k_block(64, 5632);
    assert!(kb < 5632 && kb.is_multiple_of(64) && 64 * kb * 4 <= X_BLOCK_BYTES);
    assert_eq!(k_block(100_000, 4096), MIN_K_BLOCK);
}

/// The vector packings ([`packed::Panels::pack`] of each instruction set this CPU has) write
/// exactly what the scalar [`packed::pack`] does: every panel width of the micro-kernels and
/// others, rows past the source (zeros), column blocks at an offset and column counts that are
/// not a multiple of the vector width. The panels start NaN-filled, so a value not written fails.
#[test]
fn vector_packing_matches_scalar_packing() {
    use packed::{PackAt, Panels, pack};
    fn check<T: Panels>(t: T, name: &str) {
        let (rows, k) = (37, 83);
        let src = values(rows * k, 5);
        for len in [1, 4, 6, 8, 12, 16, 32] {
            for r0 in [0, 3, 29, 36] {
                for (k0, kc) in [(0, 83), (0, 8), (5, 64), (11, 13), (80, 3), (1, 7)] {
                    let at = PackAt {
                        rows,
                        k,
                        k0,
                        kc,
                        r0,
                    };
                    let mut want = vec![f32::NAN; len * kc];
                    let mut got = want.clone();
                    pack(&src, at, &mut want);
                    t.pack(&src, at, &mut got);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{name}: len {len}, rows {r0}.., columns {k0}..{}",
                        k0 + kc
                    );
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(t) = x86::Avx512::detect() {
            check(t, "avx512");
        }
        if let Some(t) = x86::Avx2Fma::detect() {
            check(t, "avx2");
        }
    }
}
