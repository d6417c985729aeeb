//! `y += x Aᵢᵀ Bᵢᵀ` for the rows of a projection, adapter `i` chosen per row, as one in-place
//! candle op over tensors: `medley_kernels`' SGMV/BGMV kernels on the CPU, their CUDA versions
//! (`kernels/cuda/lora.cu`) on a GPU with the `cuda` feature.
//!
//! The rows arrive as [`KernelRows`]: SGMV segments (runs of rows sharing an adapter: prefill) or,
//! when every run is one row long (decode), a BGMV table with one adapter index per row.
//!
//! One call may serve several projections of one input whose outputs sit side by side in `y`
//! (a stacked q/k/v or gate/up product, [`add_lora_parts`]): on a GPU one launch pair for all
//! of them, each adapter with or without factors for each part.
//!
//! Operand types: on the CPU `x` and `y` are f32; on a GPU they are f32, bf16 or f16 (the same
//! for both), accumulated in f32 and rounded once into `y`. The factors are f32
//! ([`super::LORA_DTYPE`]) everywhere, as PEFT keeps them.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, StorageRef, Tensor};
use medley_kernels::cpu::CpuKernels;
use medley_kernels::{
    Factors, NO_ADAPTER, RowMapping, Segment, Shape as KernelShape, restrict_rows,
    restrict_segments,
};

use crate::model::layers::{cpu_f32_slice, cpu_f32_slice_mut};

/// One adapter's factors for one projection, as device tensors.
#[derive(Debug, Clone, Copy)]
pub struct LoraFactors<'a> {
    /// The rank `r`.
    pub rank: usize,
    /// `A`, `[r, in]`, f32, contiguous.
    pub a: &'a Tensor,
    /// `scale · Bᵀ`, `[r, out]`, f32, contiguous.
    pub b_t: &'a Tensor,
}

/// Which rows use which adapter (an index into the factor list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelRows {
    /// SGMV: runs of rows; rows outside every segment are left alone.
    Segments(Vec<Segment>),
    /// BGMV: one adapter index per row, [`NO_ADAPTER`] for none.
    PerRow(Vec<u32>),
}

impl KernelRows {
    /// BGMV when every segment is one row long (a decode step), SGMV otherwise.
    pub fn from_segments(rows: usize, segments: Vec<Segment>) -> Self {
        if !segments.iter().all(|s| s.len == 1) {
            return Self::Segments(segments);
        }
        Self::PerRow(row_table(rows, &segments))
    }

    /// The same mapping as one adapter index per row (of `rows`).
    pub fn per_row(&self, rows: usize) -> Self {
        match self {
            Self::Segments(s) => Self::PerRow(row_table(rows, s)),
            Self::PerRow(t) => Self::PerRow(t.clone()),
        }
    }

    /// Checks that every row and adapter index is in range for `rows` rows and `adapters`
    /// adapters (the GPU kernels index with them unchecked).
    pub fn check(&self, rows: usize, adapters: usize) -> candle_core::Result<()> {
        let ok = match self {
            Self::Segments(s) => s
                .iter()
                .all(|s| s.adapter < adapters && s.start.saturating_add(s.len) <= rows),
            Self::PerRow(t) => {
                t.len() == rows
                    && t.iter()
                        .all(|&a| a == NO_ADAPTER || (a as usize) < adapters)
            }
        };
        if !ok {
            candle_core::bail!(
                "lora kernels: a row mapping outside {rows} rows × {adapters} adapters"
            );
        }
        Ok(())
    }

    /// The mapping with each adapter index `a` replaced by `keep[a]`: rows whose adapter maps
    /// to `None` (or past `keep`) then have none (segments are dropped).
    pub fn restricted(&self, keep: &[Option<usize>]) -> Self {
        match self {
            Self::Segments(s) => Self::Segments(restrict_segments(s, keep)),
            Self::PerRow(t) => Self::PerRow(restrict_rows(t, keep)),
        }
    }

    /// The kernels' view of the mapping.
    pub fn mapping(&self) -> RowMapping<'_> {
        match self {
            Self::Segments(s) => RowMapping::Segments(s),
            Self::PerRow(t) => RowMapping::PerRow(t),
        }
    }
}

/// One adapter index per row of `rows` from `segments` ([`NO_ADAPTER`] outside them; rows past
/// `rows` are ignored).
fn row_table(rows: usize, segments: &[Segment]) -> Vec<u32> {
    let mut table = vec![NO_ADAPTER; rows];
    for s in segments {
        let end = s.start.saturating_add(s.len).min(rows);
        if let Some(run) = table.get_mut(s.start.min(end)..end) {
            run.fill(s.adapter as u32);
        }
    }
    table
}

/// The factors of one call over the projections side by side in `y`: `widths` (their output
/// columns, in order) and, for each adapter of the row mapping and each part, its factors or
/// `None` (adapter-major: `entries[adapter * widths.len() + part]`).
#[derive(Debug, Clone)]
pub struct PartFactors<'a> {
    /// Output columns of each part.
    pub widths: Vec<usize>,
    /// One entry per (adapter, part).
    pub entries: Vec<Option<LoraFactors<'a>>>,
}

impl<'a> PartFactors<'a> {
    /// One projection of `out` columns, every adapter with factors for it.
    pub fn single(out: usize, factors: &[LoraFactors<'a>]) -> Self {
        Self {
            widths: vec![out],
            entries: factors.iter().copied().map(Some).collect(),
        }
    }

    /// Adapters (entries per part).
    pub fn adapters(&self) -> usize {
        self.entries.len() / self.widths.len().max(1)
    }

    /// Part `p`'s factors and, for each adapter, its index among them (`None` without).
    pub fn part(&self, p: usize) -> (Vec<LoraFactors<'a>>, Vec<Option<usize>>) {
        let mut factors = Vec::new();
        let keep = (0..self.adapters())
            .map(|i| {
                self.entries[i * self.widths.len() + p].map(|f| {
                    factors.push(f);
                    factors.len() - 1
                })
            })
            .collect();
        (factors, keep)
    }
}

/// Adds the LoRA products to `y` (`[rows, out]`, a fresh tensor nobody else reads) in place.
/// `x` is `[rows, in]`, contiguous, on `y`'s device. On the CPU `y` is contiguous; on a GPU it
/// may also be a column range of a wider tensor (each row contiguous), whose other columns the
/// op leaves alone.
pub fn add_lora(
    x: &Tensor,
    y: &Tensor,
    rows: &KernelRows,
    factors: &[LoraFactors<'_>],
) -> candle_core::Result<()> {
    add_lora_parts(x, y, rows, &PartFactors::single(y.dim(1)?, factors))
}

/// [`add_lora`] for several projections of `x` whose outputs sit side by side in `y`
/// (`factors.widths`, summing to `y`'s columns): one launch pair on a GPU; on the CPU one pass
/// of the kernels per part over a copy of its columns.
pub fn add_lora_parts(
    x: &Tensor,
    y: &Tensor,
    rows: &KernelRows,
    factors: &PartFactors<'_>,
) -> candle_core::Result<()> {
    let parts = factors.widths.len();
    if parts == 0
        || parts > medley_kernels::launch::MAX_PARTS
        || factors.entries.len() != factors.adapters() * parts
        || factors.widths.iter().sum::<usize>() != y.dim(1)?
    {
        candle_core::bail!(
            "lora kernels: {} entries over parts {:?} do not fit y {:?}",
            factors.entries.len(),
            factors.widths,
            y.shape()
        );
    }
    if factors.entries.iter().all(Option::is_none) {
        return Ok(());
    }
    if y.device().is_cpu() {
        return add_lora_cpu(x, y, rows, factors);
    }
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        return super::lora_op_cuda::add_lora(x, y, rows, factors);
    }
    candle_core::bail!("lora kernels: no implementation for {:?}", y.device())
}

/// The CUDA kernels a decode step's rows ([`KernelRows::PerRow`]) go through. The fused kernels
/// also take segment mappings of up to [`FUSED_SEGMENT_ROWS`] rows (a decode step whose
/// neighbouring rows share an adapter), as one adapter index per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BgmvKernels {
    /// One block per row (and slice of the rank or output): an adapter's factors are read once
    /// per row that uses it.
    PerRow,
    /// One block per adapter (and slice): its rows are found in the kernel and accumulated
    /// together, so its factors are read once per block.
    Grouped,
    /// The per-row shrink and expand in one launch (blocks take tickets; an expand block waits
    /// for its row's shrink blocks): one launch gap instead of two.
    Fused,
    /// The grouped shrink and expand in one launch (an expand block waits for its adapter's
    /// shrink blocks).
    FusedGrouped,
}

/// Most rows of a segment mapping that the fused kernels ([`BgmvKernels::is_fused`]) take (per
/// row, in one launch): a decode step's batch. Longer mappings (prefill) go through the SGMV
/// kernels, whose blocks reuse an adapter's factor rows over several rows of its segment.
pub const FUSED_SEGMENT_ROWS: usize = 64;

/// [`BgmvKernels`] in use: 0 until first asked, then 1 + its index in [`BgmvKernels::ALL`].
static BGMV_KERNELS: AtomicU8 = AtomicU8::new(0);

impl BgmvKernels {
    /// All of them, for checks and benchmarks.
    pub const ALL: [Self; 4] = [Self::PerRow, Self::Grouped, Self::Fused, Self::FusedGrouped];

    /// The kernels in use: [`set_bgmv_kernels`]'s choice, else `MEDLEY_LORA_BGMV` (one of the
    /// [`name`](Self::name)s), else per-row (the kernels the GPU runs of 2026-12-04 checked end
    /// to end).
    pub fn current() -> Self {
        let code = BGMV_KERNELS.load(Ordering::Relaxed);
        if let Some(&kernels) = Self::ALL.get((code as usize).wrapping_sub(1)) {
            return kernels;
        }
        let chosen = match std::env::var("MEDLEY_LORA_BGMV") {
            Err(_) => Self::PerRow,
            Ok(value) => Self::from_name(&value).unwrap_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                tracing::warn!(
                    value,
                    names = names.join(", "),
                    "MEDLEY_LORA_BGMV names no BGMV kernel set; using row"
                );
                Self::PerRow
            }),
        };
        set_bgmv_kernels(chosen);
        chosen
    }

    /// The kernels of short name `name` ([`name`](Self::name)).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// A short name (`row`, `grouped`, `fused`, `fused-grouped`), as `MEDLEY_LORA_BGMV` takes
    /// it.
    pub fn name(self) -> &'static str {
        match self {
            Self::PerRow => "row",
            Self::Grouped => "grouped",
            Self::Fused => "fused",
            Self::FusedGrouped => "fused-grouped",
        }
    }

    /// Whether a decode step's LoRA product is one launch (and short segment mappings go per
    /// row through it, see [`FUSED_SEGMENT_ROWS`]).
    pub fn is_fused(self) -> bool {
        matches!(self, Self::Fused | Self::FusedGrouped)
    }
}

/// Makes the CUDA op run decode rows through `kernels` from now on (all threads).
pub fn set_bgmv_kernels(kernels: BgmvKernels) {
    let index = BgmvKernels::ALL.iter().position(|&k| k == kernels);
    BGMV_KERNELS.store(index.map_or(0, |i| i as u8 + 1), Ordering::Relaxed);
}

/// Device tables the CUDA op has uploaded since the start: `(factor tables, row tables)`. Each
/// is uploaded when first used and then reused (see `lora_op_cuda`); `(0, 0)` without CUDA.
pub fn cuda_table_uploads() -> (u64, u64) {
    #[cfg(feature = "cuda")]
    return super::lora_op_cuda::table_uploads();
    #[cfg(not(feature = "cuda"))]
    (0, 0)
}

/// The slice of an f32 CPU tensor's storage.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu_f32_slice(cpu, layout),
        _ => candle_core::bail!("lora kernels need f32 tensors on the CPU"),
    }
}

fn add_lora_cpu(
    x: &Tensor,
    y: &Tensor,
    rows: &KernelRows,
    factors: &PartFactors<'_>,
) -> candle_core::Result<()> {
    // Per part: the adapters with factors for it, and the rows restricted to them.
    let parts: Vec<(Vec<LoraFactors<'_>>, KernelRows)> = (0..factors.widths.len())
        .map(|p| {
            let (fs, keep) = factors.part(p);
            (fs, rows.restricted(&keep))
        })
        .collect();
    let guards: Vec<Vec<(StorageRef<'_>, &Layout)>> = parts
        .iter()
        .map(|(fs, _)| {
            fs.iter()
                .flat_map(|f| [f.a.storage_and_layout(), f.b_t.storage_and_layout()])
                .collect()
        })
        .collect();
    let mut op_parts = Vec::with_capacity(parts.len());
    for (((fs, part_rows), guards), &width) in parts.iter().zip(&guards).zip(&factors.widths) {
        let mut slices = Vec::with_capacity(fs.len());
        for (pair, f) in guards.chunks_exact(2).zip(fs) {
            slices.push(Factors {
                rank: f.rank,
                a: cpu_f32(&pair[0].0, pair[0].1)?,
                b_t: cpu_f32(&pair[1].0, pair[1].1)?,
            });
        }
        op_parts.push(CpuPart {
            width,
            mapping: part_rows.mapping(),
            factors: slices,
        });
    }
    y.inplace_op2(x, &CpuLoraOp { parts: op_parts })
}

/// One part of [`CpuLoraOp`]: its columns' width, its rows and its adapters' factors.
struct CpuPart<'a> {
    width: usize,
    mapping: RowMapping<'a>,
    factors: Vec<Factors<'a, [f32]>>,
}

/// `y += LoRA(x)` as an in-place candle op over the CPU storages of `y` (first operand) and `x`,
/// part by part (a lone part in place, each of several on a copy of its columns).
struct CpuLoraOp<'a> {
    parts: Vec<CpuPart<'a>>,
}

impl InplaceOp2 for CpuLoraOp<'_> {
    fn name(&self) -> &'static str {
        "medley-lora"
    }

    fn cpu_fwd(
        &self,
        ys: &mut CpuStorage,
        yl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, out_features) = yl.shape().dims2()?;
        let (x_rows, in_features) = xl.shape().dims2()?;
        if x_rows != rows {
            candle_core::bail!("lora op: x has {x_rows} rows, y has {rows}");
        }
        let out = cpu_f32_slice_mut(ys, yl)?;
        let x = cpu_f32_slice(xs, xl)?;
        let apply = |part: &CpuPart<'_>, y: &mut [f32]| {
            if part.factors.is_empty() {
                return Ok(());
            }
            let shape = KernelShape {
                rows,
                in_features,
                out_features: part.width,
            };
            CpuKernels
                .apply(shape, x, part.mapping, &part.factors, y)
                .map_err(|e| candle_core::Error::Msg(format!("lora kernel: {e}")))
        };
        if let [part] = self.parts.as_slice() {
            return apply(part, out);
        }
        let mut start = 0;
        for part in &self.parts {
            let columns =
                |r: usize| r * out_features + start..r * out_features + start + part.width;
            let mut cols: Vec<f32> = (0..rows).flat_map(|r| out[columns(r)].to_vec()).collect();
            apply(part, &mut cols)?;
            for (r, row) in cols.chunks_exact(part.width.max(1)).enumerate() {
                out[columns(r)].copy_from_slice(row);
            }
            start += part.width;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: usize, len: usize, adapter: usize) -> Segment {
        Segment {
            start,
            len,
            adapter,
        }
    }

    #[test]
    fn decode_rows_become_a_table_and_prefill_runs_stay_segments() {
        let decode = KernelRows::from_segments(4, vec![seg(0, 1, 1), seg(2, 1, 0)]);
        assert_eq!(
            decode,
            KernelRows::PerRow(vec![1, NO_ADAPTER, 0, NO_ADAPTER])
        );
        let prefill = KernelRows::from_segments(4, vec![seg(0, 3, 1), seg(3, 1, 0)]);
        assert_eq!(
            prefill,
            KernelRows::Segments(vec![seg(0, 3, 1), seg(3, 1, 0)])
        );
        assert!(decode.check(4, 2).is_ok());
        assert!(decode.check(4, 1).is_err());
        assert!(decode.check(5, 2).is_err());
        assert!(prefill.check(4, 2).is_ok());
        assert!(prefill.check(3, 2).is_err());
        assert!(prefill.check(4, 1).is_err());
        // Per row: each segment's rows take its adapter, the rest none; rows past the count
        // are dropped.
        assert_eq!(
            prefill.per_row(5),
            KernelRows::PerRow(vec![1, 1, 1, 0, NO_ADAPTER])
        );
        assert_eq!(prefill.per_row(2), KernelRows::PerRow(vec![1, 1]));
        let far = KernelRows::Segments(vec![seg(7, 2, 0)]);
        assert_eq!(far.per_row(3), KernelRows::PerRow(vec![NO_ADAPTER; 3]));
        assert_eq!(decode.per_row(4), decode);
    }

    #[test]
    fn kernel_sets_round_trip_through_their_names() {
        for k in BgmvKernels::ALL {
            assert_eq!(BgmvKernels::from_name(k.name()), Some(k));
        }
        assert_eq!(
            BgmvKernels::from_name("fused-grouped"),
            Some(BgmvKernels::FusedGrouped)
        );
        assert_eq!(BgmvKernels::from_name("Row"), None);
        let before = BgmvKernels::current();
        for k in BgmvKernels::ALL {
            set_bgmv_kernels(k);
            assert_eq!(BgmvKernels::current(), k);
        }
        set_bgmv_kernels(before);
    }

    #[test]
    fn restricted_mappings_drop_the_adapters_left_out() {
        let keep = [None, Some(0)];
        let decode = KernelRows::PerRow(vec![1, NO_ADAPTER, 0, 1]);
        assert_eq!(
            decode.restricted(&keep),
            KernelRows::PerRow(vec![0, NO_ADAPTER, NO_ADAPTER, 0])
        );
        let prefill = KernelRows::Segments(vec![seg(0, 3, 1), seg(3, 1, 0)]);
        assert_eq!(
            prefill.restricted(&keep),
            KernelRows::Segments(vec![seg(0, 3, 0)])
        );
    }

    /// Two projections side by side in one call, one adapter without factors for the first:
    /// the same values as one call per projection over its own columns.
    #[test]
    fn parts_side_by_side_match_one_call_each() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let t = |n: usize, shape: (usize, usize), seed: u64| {
            Tensor::from_vec(medley_kernels::testing::values(n, seed), shape, &dev).unwrap()
        };
        let (rows, inf, widths) = (5, 12, [7usize, 3]);
        let x = t(rows * inf, (rows, inf), 1);
        let y = t(rows * 10, (rows, 10), 2);
        let a: Vec<Tensor> = (0..4).map(|k| t(2 * inf, (2, inf), 10 + k)).collect();
        let b: Vec<Tensor> = (0..4)
            .map(|k| {
                t(
                    2 * widths[k as usize % 2],
                    (2, widths[k as usize % 2]),
                    20 + k,
                )
            })
            .collect();
        let f = |k: usize| LoraFactors {
            rank: 2,
            a: &a[k],
            b_t: &b[k],
        };
        // Adapter 0: both parts (entries 0, 1); adapter 1: the second part only (entry 3).
        let rows_map =
            KernelRows::from_segments(rows, vec![seg(0, 2, 0), seg(2, 1, 1), seg(4, 1, 0)]);
        let together = y.copy().unwrap();
        let factors = PartFactors {
            widths: widths.to_vec(),
            entries: vec![Some(f(0)), Some(f(1)), None, Some(f(3))],
        };
        add_lora_parts(&x, &together, &rows_map, &factors).unwrap();
        let first = y.narrow(1, 0, 7).unwrap().contiguous().unwrap();
        add_lora(&x, &first, &rows_map.restricted(&[Some(0), None]), &[f(0)]).unwrap();
        let second = y.narrow(1, 7, 3).unwrap().contiguous().unwrap();
        add_lora(&x, &second, &rows_map, &[f(1), f(3)]).unwrap();
        let apart = Tensor::cat(&[&first, &second], 1).unwrap();
        let diff = (&together - apart).unwrap().abs().unwrap();
        let max: f32 = diff.max_all().unwrap().to_scalar().unwrap();
        assert_eq!(max, 0.0);
        // Something was added to the mapped rows; row 3 (no adapter) and adapter 1's columns
        // of the first part (row 2) kept their values.
        let (before, after) = (
            y.to_vec2::<f32>().unwrap(),
            together.to_vec2::<f32>().unwrap(),
        );
        assert_ne!(before[0], after[0]);
        assert_eq!(before[3], after[3]);
        assert_eq!(before[2][..7], after[2][..7]);
        assert_ne!(before[2][7..], after[2][7..]);
    }
}
