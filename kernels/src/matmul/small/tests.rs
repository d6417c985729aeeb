//! `gemm_small` against an f64 reference for every layout, update and instruction set.

use super::*;
use crate::testing::values;

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

/// A `[rows, cols]` matrix stored in one of three layouts.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Row-major with 3 spare values per row.
    RowMajor,
    /// Column-major (the transpose of a row-major store) with 2 spare values per column.
    ColMajor,
    /// Neither stride is 1.
    Strided,
}

/// Stores `m` (row-major `[rows, cols]`) in `layout`; returns the data and its strides.
fn store(m: &[f32], rows: usize, cols: usize, layout: Layout) -> (Vec<f32>, usize, usize) {
    let (rs, cs, len) = match layout {
        Layout::RowMajor => (cols + 3, 1, rows * (cols + 3)),
        Layout::ColMajor => (1, rows + 2, cols * (rows + 2)),
        Layout::Strided => (2 * cols + 1, 2, rows * (2 * cols + 1)),
    };
    let mut data = vec![f32::NAN; len.max(1)];
    for i in 0..rows {
        for j in 0..cols {
            data[i * rs + j * cs] = m[i * cols + j];
        }
    }
    (data, rs, cs)
}

/// One product of `[m, n, k]` with every layout of `a` and `b`, each update and ISA, against
/// f64 within the bound of `matmul`'s tests (`(k + 1) · ε · Σ|terms|`, one more rounding for
/// the scale or the start value). Values between output rows must stay untouched.
fn check(m: usize, n: usize, k: usize) {
    let a = values(m * k, 11 + m as u64);
    let b = values(k * n, 5 + n as u64);
    let y0 = values(m * n, 3);
    let y_rs = n + 2;
    for isa in isas() {
        for la in [Layout::RowMajor, Layout::ColMajor, Layout::Strided] {
            for lb in [Layout::RowMajor, Layout::ColMajor, Layout::Strided] {
                let (ad, ars, acs) = store(&a, m, k, la);
                let (bd, brs, bcs) = store(&b, k, n, lb);
                for update in [Update::Store, Update::Scale(0.37), Update::Accumulate] {
                    let mut y = vec![-7.5f32; m * y_rs];
                    for i in 0..m {
                        y[i * y_rs..i * y_rs + n].copy_from_slice(&y0[i * n..(i + 1) * n]);
                    }
                    let sa = Strided {
                        data: &ad,
                        rs: ars,
                        cs: acs,
                    };
                    let sb = Strided {
                        data: &bd,
                        rs: brs,
                        cs: bcs,
                    };
                    gemm_small(isa, [m, n, k], sa, sb, &mut y, y_rs, update).expect("gemm");
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut abs) = (0f64, 0f64);
                            for kk in 0..k {
                                let p = a[i * k + kk] as f64 * b[kk * n + j] as f64;
                                want += p;
                                abs += p.abs();
                            }
                            let old = y0[i * n + j] as f64;
                            match update {
                                Update::Store => {}
                                Update::Scale(s) => {
                                    want *= s as f64;
                                    abs *= s as f64;
                                }
                                Update::Accumulate => {
                                    want += old;
                                    abs += old.abs();
                                }
                            }
                            let got = y[i * y_rs + j] as f64;
                            let bound = (k + 2) as f64 * f32::EPSILON as f64 * abs;
                            assert!(
                                (got - want).abs() <= bound,
                                "{isa:?} {la:?}×{lb:?} {update:?} [{m},{n},{k}] ({i},{j}): \
                                 {got} vs {want}"
                            );
                        }
                        assert!(
                            y[i * y_rs + n..(i + 1) * y_rs].iter().all(|&v| v == -7.5),
                            "{isa:?}: wrote between rows"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matches_f64_reference_across_tile_edges() {
    for (m, n, k) in [
        (1, 1, 1),
        (5, 7, 3),
        (12, 32, 64),
        (13, 33, 17),
        (24, 64, 128),
        (126, 128, 64),
        (128, 64, 128),
        (37, 100, 1),
    ] {
        check(m, n, k);
    }
}

/// An empty sum stores zeros (or leaves the output when accumulating); empty outputs are fine.
#[test]
fn empty_dimensions() {
    for isa in isas() {
        let mut y = vec![1f32; 6];
        let none = Strided::row_major(&[], 0);
        gemm_small(isa, [2, 3, 0], none, none, &mut y, 3, Update::Accumulate).expect("gemm");
        assert_eq!(y, vec![1.0; 6]);
        gemm_small(isa, [2, 3, 0], none, none, &mut y, 3, Update::Store).expect("gemm");
        assert_eq!(y, vec![0.0; 6]);
        let b = [2f32; 12];
        let b = Strided::row_major(&b, 3);
        gemm_small(isa, [0, 3, 4], none, b, &mut y, 3, Update::Store).expect("gemm");
        assert_eq!(y, vec![0.0; 6]);
    }
}

/// A row's outputs are the same bits whether it is computed alone or among many rows.
#[test]
fn rows_do_not_depend_on_the_call() {
    let (m, n, k) = (40, 70, 96);
    let a = values(m * k, 1);
    let b = values(n * k, 2);
    for isa in isas() {
        let mut all = vec![0f32; m * n];
        let bt = Strided::transposed(&b, k);
        gemm_small(
            isa,
            [m, n, k],
            Strided::row_major(&a, k),
            bt,
            &mut all,
            n,
            Update::Store,
        )
        .expect("gemm");
        for i in [0, 13, 39] {
            let mut one = vec![0f32; n];
            let row = Strided::row_major(&a[i * k..(i + 1) * k], k);
            gemm_small(isa, [1, n, k], row, bt, &mut one, n, Update::Store).expect("gemm");
            assert_eq!(one, all[i * n..(i + 1) * n], "{isa:?} row {i}");
        }
    }
}

#[test]
fn bad_buffers_are_errors() {
    let a = vec![0f32; 6];
    let sa = Strided::row_major(&a, 3);
    let mut y = vec![0f32; 4];
    let err = gemm_small(Isa::Portable, [2, 2, 3], sa, sa, &mut y, 1, Update::Store);
    assert!(
        matches!(err, Err(KernelError::OverlappingRows { .. })),
        "{err:?}"
    );
    let err = gemm_small(Isa::Portable, [2, 2, 4], sa, sa, &mut y, 2, Update::Store);
    assert!(
        matches!(err, Err(KernelError::BufferTooSmall { .. })),
        "{err:?}"
    );
    let mut short = vec![0f32; 3];
    let b = Strided::row_major(&a, 2);
    let err = gemm_small(
        Isa::Portable,
        [2, 2, 3],
        sa,
        b,
        &mut short,
        2,
        Update::Store,
    );
    assert!(
        matches!(err, Err(KernelError::BufferTooSmall { .. })),
        "{err:?}"
    );
}

/// Operands packed before give the same bits as the same blocks packed by the call, for whole
/// operands and for views of rows and of aligned column ranges.
#[test]
fn packed_operands_match_strided_ones() {
    let (m, k_all, n_all) = (29, 150, 100);
    let a_all = values(m * k_all, 21);
    let b_all = values(k_all * n_all, 22);
    for isa in isas() {
        let a = PackedLhs::new(isa, Strided::row_major(&a_all, k_all), m, k_all).expect("pack");
        let b = PackedRhs::new(isa, Strided::row_major(&b_all, n_all), k_all, n_all).expect("pack");
        assert_eq!((a.shape(), b.shape()), ([m, k_all], [k_all, n_all]));
        let al = b.col_align();
        let blocks = [
            (0..k_all, 0..n_all),
            (7..90, al..n_all),
            (0..1, 0..n_all.min(al) - 1),
        ];
        for (rows, cols) in blocks {
            let (k, n) = (rows.len(), cols.len());
            // The left operand: the packed one only covers all of `k`; take columns `rows` of
            // `a` for the strided run and a fresh packing of them for the packed run.
            let a_part = Strided::row_major(&a_all[rows.start..], k_all);
            let b_part = Strided::row_major(&b_all[rows.start * n_all + cols.start..], n_all);
            let want = {
                let mut y = vec![f32::NAN; m * n];
                gemm_small(isa, [m, n, k], a_part, b_part, &mut y, n, Update::Store).expect("gemm");
                y
            };
            let a_packed = if k == k_all {
                a.clone()
            } else {
                PackedLhs::new(isa, a_part, m, k).expect("pack")
            };
            let view = b.view(rows.clone(), cols.clone()).expect("view");
            let mut got = vec![f32::NAN; m * n];
            gemm_small(isa, [m, n, k], &a_packed, view, &mut got, n, Update::Store).expect("gemm");
            assert_eq!(got, want, "{isa:?} rows {rows:?} cols {cols:?}");
        }
    }
}

#[test]
fn packed_operands_are_checked() {
    let v = values(64, 1);
    let isa = Isa::detect();
    let b = PackedRhs::new(isa, Strided::row_major(&v, 8), 8, 8).expect("pack");
    let a = PackedLhs::new(isa, Strided::row_major(&v, 8), 8, 8).expect("pack");
    assert!(matches!(
        b.view(0..9, 0..8),
        Err(KernelError::PackedOperand { .. })
    ));
    assert!(matches!(
        b.view(0..8, 0..9),
        Err(KernelError::PackedOperand { .. })
    ));
    if b.col_align() > 1 {
        assert!(matches!(
            b.view(0..8, 1..8),
            Err(KernelError::PackedOperand { .. })
        ));
    }
    let mut y = vec![0f32; 64];
    let view = b.view(0..8, 0..8).expect("view");
    // A shape the packed operands do not have.
    let err = gemm_small(isa, [8, 8, 4], &a, view.clone(), &mut y, 8, Update::Store);
    assert!(
        matches!(err, Err(KernelError::PackedOperand { .. })),
        "{err:?}"
    );
    // Operands packed for another instruction set.
    for other in isas().into_iter().filter(|&o| o != isa) {
        let err = gemm_small(other, [8, 8, 8], &a, view.clone(), &mut y, 8, Update::Store);
        assert!(
            matches!(err, Err(KernelError::PackedOperand { .. })),
            "{err:?}"
        );
    }
    let short = PackedLhs::new(isa, Strided::row_major(&v[..60], 8), 8, 8);
    assert!(matches!(short, Err(KernelError::BufferTooSmall { .. })));
}
