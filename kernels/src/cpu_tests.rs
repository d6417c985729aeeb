//! Tests of the CPU LoRA kernels against the reference loops.

use super::*;
use crate::reference;
use crate::testing::values;

fn shape(rows: usize, in_features: usize, out_features: usize) -> Shape {
    Shape {
        rows,
        in_features,
        out_features,
    }
}

struct Case {
    rows: usize,
    inf: usize,
    outf: usize,
    x: Vec<f32>,
    y0: Vec<f32>,
    factors: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

impl Case {
    fn new(rows: usize, inf: usize, outf: usize, ranks: &[usize]) -> Self {
        let factors = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let s = 10 + i as u64;
                (r, values(r * inf, s), values(r * outf, s + 100))
            })
            .collect();
        Self {
            rows,
            inf,
            outf,
            x: values(rows * inf, 1),
            y0: values(rows * outf, 2),
            factors,
        }
    }

    fn adapters(&self) -> Vec<Factors<'_, [f32]>> {
        self.factors
            .iter()
            .map(|(r, a, b)| Factors {
                rank: *r,
                a: a.as_slice(),
                b_t: b.as_slice(),
            })
            .collect()
    }

    fn reference(&self, mapping: RowMapping<'_>) -> Vec<f32> {
        let mut y = self.y0.clone();
        let dims = Dims {
            rows: self.rows,
            in_features: self.inf,
            out_features: self.outf,
            t_stride: 64,
        };
        reference::add_lora(dims, &self.x, mapping, &self.adapters(), &mut y).unwrap();
        y
    }

    fn cpu(&self, mapping: RowMapping<'_>) -> Vec<f32> {
        let mut y = self.y0.clone();
        CpuKernels
            .apply(
                shape(self.rows, self.inf, self.outf),
                &self.x,
                mapping,
                &self.adapters(),
                &mut y,
            )
            .unwrap();
        y
    }
}

/// f32 sums of `in` (≤ 300) products of values in [-1, 1) against an f64 reference: the
/// rounding error is bounded by about `n · 2⁻²⁴ · Σ|terms|`, far below 1e-4 here.
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{i}: {g} vs {w}");
    }
}

#[test]
fn sgmv_matches_reference() {
    // Odd sizes exercise the dot-product remainder; rows 5..7 and 13 have no adapter.
    let c = Case::new(14, 37, 29, &[3, 8, 1]);
    let segs = [
        Segment {
            start: 0,
            len: 5,
            adapter: 1,
        },
        Segment {
            start: 7,
            len: 6,
            adapter: 0,
        },
        Segment {
            start: 5,
            len: 0,
            adapter: 2,
        },
    ];
    let want = c.reference(RowMapping::Segments(&segs));
    assert_close(&c.cpu(RowMapping::Segments(&segs)), &want);
    // Unmapped rows are untouched, mapped rows changed.
    assert_eq!(want[5 * 29..7 * 29], c.y0[5 * 29..7 * 29]);
    assert_eq!(want[13 * 29..], c.y0[13 * 29..]);
    assert_ne!(want[..29], c.y0[..29]);
}

/// Large enough for the fused pass to fork (`FUSED_PARALLEL_MIN_MACS`): the fused
/// `add_lora` equals the reference and the separate shrink and expand calls, bit for bit
/// against the latter (same per-row arithmetic).
#[test]
fn fused_parallel_pass_matches_reference_and_split_calls() {
    let c = Case::new(40, 300, 500, &[16, 4, 16, 8]);
    let per_row: Vec<u32> = (0..40u32)
        .map(|r| if r % 7 == 6 { NO_ADAPTER } else { r % 4 })
        .collect();
    let macs: usize = per_row
        .iter()
        .filter(|&&a| a != NO_ADAPTER)
        .map(|&a| c.factors[a as usize].0 * (300 + 500))
        .sum();
    assert!(macs >= FUSED_PARALLEL_MIN_MACS);
    let mapping = RowMapping::PerRow(&per_row);
    let fused = c.cpu(mapping);
    assert_close(&fused, &c.reference(mapping));
    let dims = Dims {
        rows: 40,
        in_features: 300,
        out_features: 500,
        t_stride: 16,
    };
    let mut t = vec![0f32; 40 * 16];
    let mut split = c.y0.clone();
    CpuKernels
        .bgmv_shrink(dims, &c.x, &per_row, &c.adapters(), &mut t)
        .unwrap();
    CpuKernels
        .bgmv_expand(dims, &t, &per_row, &c.adapters(), &mut split)
        .unwrap();
    assert_eq!(fused, split);
}

#[test]
fn bgmv_matches_reference_and_sgmv() {
    let c = Case::new(16, 300, 70, &[16, 4, 16, 8]);
    let per_row: Vec<u32> = (0..16u32)
        .map(|r| if r % 5 == 4 { NO_ADAPTER } else { r % 4 })
        .collect();
    let want = c.reference(RowMapping::PerRow(&per_row));
    assert_close(&c.cpu(RowMapping::PerRow(&per_row)), &want);
    // The same mapping as length-1 segments gives the same result.
    let segs: Vec<Segment> = per_row
        .iter()
        .enumerate()
        .filter(|(_, a)| **a != NO_ADAPTER)
        .map(|(r, a)| Segment {
            start: r,
            len: 1,
            adapter: *a as usize,
        })
        .collect();
    assert_close(&c.cpu(RowMapping::Segments(&segs)), &want);
}

#[test]
fn reference_is_the_formula() {
    // 1 row, in 2, out 2, rank 1: x = [1, 2], A = [[3, 4]], Bᵀ = [[5, 6]] → t = 11,
    // y += [55, 66].
    let (a, b) = ([3f32, 4.], [5f32, 6.]);
    let f = [Factors {
        rank: 1,
        a: &a[..],
        b_t: &b[..],
    }];
    let mut y = vec![1f32, -1.];
    let dims = Dims {
        rows: 1,
        in_features: 2,
        out_features: 2,
        t_stride: 1,
    };
    reference::add_lora(dims, &[1., 2.], RowMapping::PerRow(&[0]), &f, &mut y).unwrap();
    assert_eq!(y, vec![56., 65.]);
    let mut y2 = vec![1f32, -1.];
    CpuKernels
        .apply(
            shape(1, 2, 2),
            &[1., 2.],
            RowMapping::PerRow(&[0]),
            &f,
            &mut y2,
        )
        .unwrap();
    assert_eq!(y2, y);
}

#[test]
fn bad_inputs_are_errors() {
    let c = Case::new(4, 8, 8, &[2]);
    let adapters = c.adapters();
    let mut y = c.y0.clone();
    let mut run = |mapping: RowMapping<'_>, x: &[f32]| {
        CpuKernels.apply(shape(4, 8, 8), x, mapping, &adapters, &mut y)
    };
    let seg = |start, len, adapter| Segment {
        start,
        len,
        adapter,
    };
    assert!(matches!(
        run(RowMapping::Segments(&[seg(3, 2, 0)]), &c.x),
        Err(KernelError::SegmentOutOfRange { .. })
    ));
    assert!(matches!(
        run(RowMapping::Segments(&[seg(0, 2, 0), seg(1, 2, 0)]), &c.x),
        Err(KernelError::OverlappingSegments { row: 1 })
    ));
    assert!(matches!(
        run(RowMapping::Segments(&[seg(0, 2, 1)]), &c.x),
        Err(KernelError::UnknownAdapter { index: 1, count: 1 })
    ));
    assert!(matches!(
        run(RowMapping::PerRow(&[0, 0]), &c.x),
        Err(KernelError::MappingLength { len: 2, rows: 4 })
    ));
    assert!(matches!(
        run(RowMapping::PerRow(&[0, 0, 0, 0]), &c.x[..5]),
        Err(KernelError::BufferTooSmall { .. })
    ));
    // A factor shorter than rank x features.
    let short = [Factors {
        rank: 2,
        a: &c.factors[0].1[..10],
        b_t: &c.factors[0].2[..],
    }];
    let mut y2 = c.y0.clone();
    assert!(matches!(
        CpuKernels.apply(
            shape(4, 8, 8),
            &c.x,
            RowMapping::PerRow(&[0; 4]),
            &short,
            &mut y2
        ),
        Err(KernelError::BufferTooSmall { .. })
    ));
    assert_eq!(y2, c.y0, "nothing written on error");
}
