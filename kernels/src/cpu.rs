//! The CPU implementation of [`LoraKernels`] on `f32` slices.
//!
//! Rows are grouped by adapter (a segment, or every row of a BGMV table with the same adapter)
//! into work items of at most `ITEM_ROWS` (8) rows; items run in parallel (rayon) and each streams
//! its adapter's factors once for all of its rows: the shrink dots each `x` row with four rows of
//! `A` at a time, the expand adds every row of `Bᵀ` into the item's `y` rows in column tiles
//! that stay in cache. On a decode step with rows of the same adapter scattered over the
//! batch, each adapter's factors are therefore read once per projection, not once per row.
//! Inner loops use AVX2 + FMA when the CPU has them (`simd.rs`).

use rayon::prelude::*;

use crate::simd::{axpy, dots};
use crate::{
    Dims, Factors, KernelError, LoraKernels, NO_ADAPTER, RowMapping, Segment, Shape, check_call,
    expand_lens, shrink_lens,
};

/// Rows per work item: enough to reuse each factor row several times from cache, few enough to
/// spread a single adapter's rows over the threads.
const ITEM_ROWS: usize = 8;

/// Columns of `y` updated together by the expand: every row of `Bᵀ` of a projection up to this
/// wide is one sequential stream (short 4 KiB tiles made each row of `Bᵀ` a separate short
/// stream from memory and cost about 2% of a 16-row decode step with 8 adapters, in
/// `benches/adapters.rs` of the shard); an item's `y` rows stay in L2 (8 rows of a 14336-wide
/// projection take 448 KiB).
const COL_TILE: usize = 1 << 16;

/// Below this many multiply-adds a product runs on the calling thread: waking rayon workers
/// costs more than it saves (measured with `benches/lora.rs`: k/v projections of a 16-row decode
/// step).
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Runs `f` on every item with its rows, in parallel when the work is large enough.
fn for_each_item<'a, F>(items: &[Item], owned: Vec<Vec<&'a mut [f32]>>, macs_per_row: usize, f: F)
where
    F: Fn(&Item, Vec<&'a mut [f32]>) + Sync + Send,
{
    let rows: usize = items.iter().map(|i| i.rows.len()).sum();
    if rows.saturating_mul(macs_per_row) < PARALLEL_MIN_MACS {
        items.iter().zip(owned).for_each(|(i, o)| f(i, o));
    } else {
        items.par_iter().zip(owned).for_each(|(i, o)| f(i, o));
    }
}

/// Batched LoRA on the CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuKernels;

impl CpuKernels {
    /// `y += x Aᵢᵀ Bᵢᵀ` per row, allocating the intermediate `t` (`[rows, max rank]`).
    pub fn apply(
        &self,
        shape: Shape,
        x: &[f32],
        mapping: RowMapping<'_>,
        adapters: &[Factors<'_, [f32]>],
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let t_stride = adapters.iter().map(|f| f.rank).max().unwrap_or(0).max(1);
        let dims = Dims {
            rows: shape.rows,
            in_features: shape.in_features,
            out_features: shape.out_features,
            t_stride,
        };
        let mut t = vec![0f32; shape.rows.saturating_mul(t_stride)];
        self.add_lora(dims, x, mapping, adapters, &mut t, y)
    }
}

impl LoraKernels for CpuKernels {
    type Buffer = [f32];

    fn add_lora(
        &self,
        dims: Dims,
        x: &[f32],
        mapping: RowMapping<'_>,
        adapters: &[Factors<'_, [f32]>],
        t: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let [xl, tl] = shrink_lens(dims, x.len(), t.len());
        let [_, yl] = expand_lens(dims, t.len(), y.len());
        check_call(dims, &[xl, tl, yl], mapping, adapters)?;
        shrink_expand(dims, x, &work_items(dims.rows, mapping), adapters, t, y);
        Ok(())
    }

    fn sgmv_shrink(
        &self,
        dims: Dims,
        x: &[f32],
        segments: &[Segment],
        adapters: &[Factors<'_, [f32]>],
        t: &mut [f32],
    ) -> Result<(), KernelError> {
        checked_shrink(dims, x, RowMapping::Segments(segments), adapters, t)
    }

    fn sgmv_expand(
        &self,
        dims: Dims,
        t: &[f32],
        segments: &[Segment],
        adapters: &[Factors<'_, [f32]>],
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        checked_expand(dims, t, RowMapping::Segments(segments), adapters, y)
    }

    fn bgmv_shrink(
        &self,
        dims: Dims,
        x: &[f32],
        row_adapters: &[u32],
        adapters: &[Factors<'_, [f32]>],
        t: &mut [f32],
    ) -> Result<(), KernelError> {
        checked_shrink(dims, x, RowMapping::PerRow(row_adapters), adapters, t)
    }

    fn bgmv_expand(
        &self,
        dims: Dims,
        t: &[f32],
        row_adapters: &[u32],
        adapters: &[Factors<'_, [f32]>],
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        checked_expand(dims, t, RowMapping::PerRow(row_adapters), adapters, y)
    }
}

/// Checks a shrink call's buffers and mapping, then runs it.
fn checked_shrink(
    dims: Dims,
    x: &[f32],
    mapping: RowMapping<'_>,
    adapters: &[Factors<'_, [f32]>],
    t: &mut [f32],
) -> Result<(), KernelError> {
    check_call(
        dims,
        &shrink_lens(dims, x.len(), t.len()),
        mapping,
        adapters,
    )?;
    shrink(dims, x, &work_items(dims.rows, mapping), adapters, t);
    Ok(())
}

/// Checks an expand call's buffers and mapping, then runs it.
fn checked_expand(
    dims: Dims,
    t: &[f32],
    mapping: RowMapping<'_>,
    adapters: &[Factors<'_, [f32]>],
    y: &mut [f32],
) -> Result<(), KernelError> {
    check_call(
        dims,
        &expand_lens(dims, t.len(), y.len()),
        mapping,
        adapters,
    )?;
    expand(dims, t, &work_items(dims.rows, mapping), adapters, y);
    Ok(())
}

/// One unit of parallel work: some rows (ascending, distinct) that use one adapter.
struct Item {
    adapter: usize,
    rows: Vec<usize>,
}

/// Groups the mapped rows by adapter, in items of at most `ITEM_ROWS` (8) rows. The mapping must
/// have been checked (in-range rows, no overlaps, known adapters).
fn work_items(rows: usize, mapping: RowMapping<'_>) -> Vec<Item> {
    let mut items = Vec::new();
    match mapping {
        RowMapping::Segments(segments) => {
            for s in segments {
                let rows: Vec<usize> = (s.start..s.start + s.len).collect();
                for chunk in rows.chunks(ITEM_ROWS) {
                    items.push(Item {
                        adapter: s.adapter,
                        rows: chunk.to_vec(),
                    });
                }
            }
        }
        RowMapping::PerRow(table) => {
            let mut by_adapter: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
            for (row, &a) in table.iter().enumerate().take(rows) {
                if a != NO_ADAPTER {
                    by_adapter.entry(a).or_default().push(row);
                }
            }
            for (adapter, rows) in by_adapter {
                for chunk in rows.chunks(ITEM_ROWS) {
                    items.push(Item {
                        adapter: adapter as usize,
                        rows: chunk.to_vec(),
                    });
                }
            }
        }
    }
    items
}

/// The `width`-wide rows of `buf` each item owns (items own distinct rows).
fn split_rows<'a>(
    buf: &'a mut [f32],
    width: usize,
    rows: usize,
    items: &[Item],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut slots: Vec<Option<&'a mut [f32]>> =
        buf[..rows * width].chunks_mut(width).map(Some).collect();
    items
        .iter()
        .map(|item| item.rows.iter().filter_map(|&r| slots[r].take()).collect())
        .collect()
}

/// `t[row, :r] = x[row] Aᵀ` for every row of every item (inputs checked).
fn shrink(dims: Dims, x: &[f32], items: &[Item], adapters: &[Factors<'_, [f32]>], t: &mut [f32]) {
    let owned = split_rows(t, dims.t_stride, dims.rows, items);
    let max_rank = adapters.iter().map(|f| f.rank).max().unwrap_or(0);
    for_each_item(
        items,
        owned,
        max_rank * dims.in_features,
        |item, mut t_rows| {
            shrink_item(dims, x, item, adapters[item.adapter], &mut t_rows);
        },
    );
}

/// `y[row] += t[row, :r] Bᵀ` for every row of every item (inputs checked).
fn expand(dims: Dims, t: &[f32], items: &[Item], adapters: &[Factors<'_, [f32]>], y: &mut [f32]) {
    let owned = split_rows(y, dims.out_features, dims.rows, items);
    let max_rank = adapters.iter().map(|f| f.rank).max().unwrap_or(0);
    for_each_item(
        items,
        owned,
        max_rank * dims.out_features,
        |item, mut y_rows| {
            let ts: Vec<&[f32]> = item
                .rows
                .iter()
                .map(|&r| &t[r * dims.t_stride..(r + 1) * dims.t_stride])
                .collect();
            expand_item(dims, &ts, adapters[item.adapter], &mut y_rows);
        },
    );
}

/// Shrink then expand, item by item, in one parallel pass: each item's `t` rows are still in
/// cache when its expand reads them, and a decode step pays for one fork-join per projection
/// instead of two (inputs checked).
fn shrink_expand(
    dims: Dims,
    x: &[f32],
    items: &[Item],
    adapters: &[Factors<'_, [f32]>],
    t: &mut [f32],
    y: &mut [f32],
) {
    let t_owned = split_rows(t, dims.t_stride, dims.rows, items);
    let y_owned = split_rows(y, dims.out_features, dims.rows, items);
    let owned: Vec<_> = t_owned.into_iter().zip(y_owned).collect();
    let macs = |item: &Item| {
        item.rows.len() * adapters[item.adapter].rank * (dims.in_features + dims.out_features)
    };
    let run = |(item, (mut t_rows, mut y_rows)): (&Item, ItemRows<'_>)| {
        let f = adapters[item.adapter];
        shrink_item(dims, x, item, f, &mut t_rows);
        let ts: Vec<&[f32]> = t_rows.iter().map(|r| &**r).collect();
        expand_item(dims, &ts, f, &mut y_rows);
    };
    if items.len() > 1 && items.iter().map(macs).sum::<usize>() >= FUSED_PARALLEL_MIN_MACS {
        items.par_iter().zip(owned).for_each(run);
    } else {
        items.iter().zip(owned).for_each(run);
    }
}

/// The `t` rows and the `y` rows one work item owns.
type ItemRows<'a> = (Vec<&'a mut [f32]>, Vec<&'a mut [f32]>);

/// Below this many multiply-adds a fused shrink + expand runs on the calling thread. Lower than
/// `PARALLEL_MIN_MACS`: the fused pass forks once, and with several adapters in a decode step
/// the work is reading their factors, which one core alone does at well under the memory
/// bandwidth.
const FUSED_PARALLEL_MIN_MACS: usize = 1 << 17;

/// `t_rows[i][:r] = x[item.rows[i]] Aᵀ`, four rows of `A` at a time against one row of `x`:
/// four independent sums keep the FMA units busy (one or two rows per adapter, as in a decode
/// step, would otherwise wait on a single chain each), `A` comes from memory once per block and
/// is reread from cache for the item's other rows. A product has the same value whichever block
/// size computes it ([`dots`] sums lane by lane in index order).
fn shrink_item(
    dims: Dims,
    x: &[f32],
    item: &Item,
    f: Factors<'_, [f32]>,
    t_rows: &mut [&mut [f32]],
) {
    let inf = dims.in_features;
    let a_row = |j: usize| &f.a[j * inf..(j + 1) * inf];
    for j0 in (0..f.rank).step_by(4) {
        let n = (f.rank - j0).min(4);
        for (&r, t_row) in item.rows.iter().zip(t_rows.iter_mut()) {
            let xr = &x[r * inf..(r + 1) * inf];
            let out = &mut t_row[j0..j0 + n];
            match n {
                1 => out.copy_from_slice(&dots(xr, [a_row(j0)])),
                2 => out.copy_from_slice(&dots(xr, [a_row(j0), a_row(j0 + 1)])),
                3 => out.copy_from_slice(&dots(xr, [a_row(j0), a_row(j0 + 1), a_row(j0 + 2)])),
                _ => out.copy_from_slice(&dots(
                    xr,
                    [a_row(j0), a_row(j0 + 1), a_row(j0 + 2), a_row(j0 + 3)],
                )),
            }
        }
    }
}

/// `y_rows[i] += ts[i][:r] Bᵀ`, in column tiles that stay in cache.
fn expand_item(dims: Dims, ts: &[&[f32]], f: Factors<'_, [f32]>, y_rows: &mut [&mut [f32]]) {
    let outf = dims.out_features;
    for c0 in (0..outf).step_by(COL_TILE) {
        let c1 = (c0 + COL_TILE).min(outf);
        for j in 0..f.rank {
            let b = &f.b_t[j * outf + c0..j * outf + c1];
            for (y_row, t_row) in y_rows.iter_mut().zip(ts) {
                axpy(t_row[j], b, &mut y_row[c0..c1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
