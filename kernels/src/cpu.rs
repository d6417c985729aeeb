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
#[path = "cpu_tests.rs"]
mod tests;
