//! `y += x Aᵢᵀ Bᵢᵀ` for the rows of a projection, adapter `i` chosen per row, as one in-place
//! candle op over tensors: `medley_kernels`' SGMV/BGMV kernels on the CPU, their CUDA versions
//! (`kernels/cuda/lora.cu`) on a GPU with the `cuda` feature.
//!
//! The rows arrive as [`KernelRows`]: SGMV segments (runs of rows sharing an adapter: prefill) or,
//! when every run is one row long (decode), a BGMV table with one adapter index per row.
//!
//! Operand types: on the CPU `x` and `y` are f32; on a GPU they are f32, bf16 or f16 (the same
//! for both), accumulated in f32 and rounded once into `y`. The factors are f32
//! ([`super::LORA_DTYPE`]) everywhere, as PEFT keeps them.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, StorageRef, Tensor};
use medley_kernels::cpu::CpuKernels;
use medley_kernels::{Factors, NO_ADAPTER, RowMapping, Segment, Shape as KernelShape};

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
        let mut table = vec![NO_ADAPTER; rows];
        for s in &segments {
            if let Some(entry) = table.get_mut(s.start) {
                *entry = s.adapter as u32;
            }
        }
        Self::PerRow(table)
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

    /// The kernels' view of the mapping.
    pub fn mapping(&self) -> RowMapping<'_> {
        match self {
            Self::Segments(s) => RowMapping::Segments(s),
            Self::PerRow(t) => RowMapping::PerRow(t),
        }
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
    if factors.is_empty() {
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

/// The CUDA kernels a decode step's rows ([`KernelRows::PerRow`]) go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BgmvKernels {
    /// One block per row (and slice of the rank or output): an adapter's factors are read once
    /// per row that uses it.
    PerRow,
    /// One block per adapter (and slice): its rows are found in the kernel and accumulated
    /// together, so its factors are read once per block.
    Grouped,
}

/// [`BgmvKernels`] in use: 0 until first asked, then 1 + its index.
static BGMV_KERNELS: AtomicU8 = AtomicU8::new(0);

impl BgmvKernels {
    /// Both, for checks and benchmarks.
    pub const ALL: [Self; 2] = [Self::PerRow, Self::Grouped];

    /// The kernels in use: [`set_bgmv_kernels`]'s choice, else `MEDLEY_LORA_BGMV` (`row` or
    /// `grouped`), else per-row (the kernels the GPU runs of 2026-12-04 checked end to end).
    pub fn current() -> Self {
        match BGMV_KERNELS.load(Ordering::Relaxed) {
            1 => Self::PerRow,
            2 => Self::Grouped,
            _ => {
                let chosen = match std::env::var("MEDLEY_LORA_BGMV").as_deref() {
                    Ok("grouped") => Self::Grouped,
                    Ok("row") | Err(_) => Self::PerRow,
                    Ok(other) => {
                        tracing::warn!(
                            value = other,
                            "MEDLEY_LORA_BGMV is row or grouped; using row"
                        );
                        Self::PerRow
                    }
                };
                set_bgmv_kernels(chosen);
                chosen
            }
        }
    }

    /// A short name (`row`, `grouped`), as `MEDLEY_LORA_BGMV` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::PerRow => "row",
            Self::Grouped => "grouped",
        }
    }
}

/// Makes the CUDA op run decode rows through `kernels` from now on (all threads).
pub fn set_bgmv_kernels(kernels: BgmvKernels) {
    let code = match kernels {
        BgmvKernels::PerRow => 1,
        BgmvKernels::Grouped => 2,
    };
    BGMV_KERNELS.store(code, Ordering::Relaxed);
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
    factors: &[LoraFactors<'_>],
) -> candle_core::Result<()> {
    let guards: Vec<(StorageRef<'_>, &Layout)> = factors
        .iter()
        .flat_map(|f| [f.a.storage_and_layout(), f.b_t.storage_and_layout()])
        .collect();
    let mut slices = Vec::with_capacity(factors.len());
    for (pair, f) in guards.chunks_exact(2).zip(factors) {
        slices.push(Factors {
            rank: f.rank,
            a: cpu_f32(&pair[0].0, pair[0].1)?,
            b_t: cpu_f32(&pair[1].0, pair[1].1)?,
        });
    }
    let op = CpuLoraOp {
        mapping: rows.mapping(),
        factors: slices,
    };
    y.inplace_op2(x, &op)
}

/// `y += LoRA(x)` as an in-place candle op over the CPU storages of `y` (first operand) and `x`.
struct CpuLoraOp<'a> {
    mapping: RowMapping<'a>,
    factors: Vec<Factors<'a, [f32]>>,
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
        CpuKernels
            .apply(
                KernelShape {
                    rows,
                    in_features,
                    out_features,
                },
                x,
                self.mapping,
                &self.factors,
                out,
            )
            .map_err(|e| candle_core::Error::Msg(format!("lora kernel: {e}")))
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
    }
}
