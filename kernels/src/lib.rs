//! Batched multi-adapter LoRA kernels: add `x Aᵢᵀ Bᵢᵀ` (scale folded into `Bᵢ`) to the rows of a
//! projection output, where different rows use different adapters `i`.
//!
//! The work splits like punica's kernels (vLLM, S-LoRA) into two grouped matmuls:
//! * **shrink** — `t[row, :rᵢ] = x[row, :] Aᵢᵀ` (`[rows, in]` → `[rows, r]`),
//! * **expand** — `y[row, :] += t[row, :rᵢ] Bᵢᵀ` (`[rows, r]` → `[rows, out]`, accumulated into `y`),
//!
//! each in two row mappings:
//! * **SGMV** (segmented gather matmul) — contiguous row [`Segment`]s share an adapter: the shape of
//!   a prefill step, where every sequence contributes a run of rows;
//! * **BGMV** (batched gather matmul-vector) — an adapter index per row ([`NO_ADAPTER`] for none):
//!   the shape of a decode step, one row per sequence in any order.
//!
//! [`LoraKernels`] is generic over the buffer type so a device implementation (CUDA, behind the
//! `cuda` feature) can implement the same four entry points over device memory; [`cpu::CpuKernels`]
//! implements it on `[f32]` slices with rayon, and [`reference`](mod@reference) holds the naive loops the
//! implementations are tested against.
//!
//! Layouts (all row-major, `f32`): `x: [rows, in]`, `y: [rows, out]`, `t: [rows, t_stride]` with
//! `t_stride >= max rank`, and per adapter `A: [rank, in]` (PEFT's `lora_A`), `Bᵀ: [rank, out]`
//! (the transpose of PEFT's `lora_B`, multiplied by the adapter's scale).
//!
//! With the `cuda` feature, `cuda` holds the same four kernels in CUDA C (`kernels/cuda/lora.cu`),
//! compiled to PTX by nvcc at build time; [`launch`] has their names and launch shapes, and the
//! `medley-kernels-emu` crate (`kernels/emu`) runs the CUDA sources on the CPU under an emulation
//! of CUDA, so CI checks them against [`reference`](mod@reference) without a GPU.
//!
//! [`matmul`] holds the base-model side of a decode step: `y = x Wᵀ` for a few rows of `x`,
//! streaming the projection weight once per call.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod launch;
pub mod matmul;
pub mod qmatmul;
pub mod reference;
mod simd;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// Marks a row without an adapter in a BGMV row mapping.
pub const NO_ADAPTER: u32 = u32::MAX;

/// Rows `start..start + len` of the batch use adapter `adapter` (an index into the adapter list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// Index of the adapter in the `adapters` slice passed with the segments.
    pub adapter: usize,
}

/// One adapter's factors for one projection.
#[derive(Debug)]
pub struct Factors<'a, B: ?Sized> {
    /// The LoRA rank `r`.
    pub rank: usize,
    /// `A`, `[rank, in]`.
    pub a: &'a B,
    /// `scale · Bᵀ`, `[rank, out]`.
    pub b_t: &'a B,
}

impl<B: ?Sized> Clone for Factors<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: ?Sized> Copy for Factors<'_, B> {}

/// Rows and features of one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rows of `x` and `y`.
    pub rows: usize,
    /// Columns of `x`.
    pub in_features: usize,
    /// Columns of `y`.
    pub out_features: usize,
}

/// Sizes of one grouped LoRA product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows of `x`, `t` and `y`.
    pub rows: usize,
    /// Columns of `x` (input features of the projection).
    pub in_features: usize,
    /// Columns of `y` (output features of the projection).
    pub out_features: usize,
    /// Row stride of the intermediate `t` (at least the largest rank used).
    pub t_stride: usize,
}

/// Which rows use which adapter.
#[derive(Debug, Clone, Copy)]
pub enum RowMapping<'a> {
    /// SGMV: runs of rows (rows outside every segment are left alone).
    Segments(&'a [Segment]),
    /// BGMV: one adapter index per row, [`NO_ADAPTER`] for none.
    PerRow(&'a [u32]),
}

/// A per-row table with each adapter index `a` replaced by `keep[a]`: rows whose adapter maps to
/// `None` (or lies past `keep`) get [`NO_ADAPTER`] (one projection of a stacked call, over the
/// adapters that have factors for it).
pub fn restrict_rows(table: &[u32], keep: &[Option<usize>]) -> Vec<u32> {
    table
        .iter()
        .map(|&a| match keep.get(a as usize).copied().flatten() {
            Some(k) if a != NO_ADAPTER => k as u32,
            _ => NO_ADAPTER,
        })
        .collect()
}

/// [`restrict_rows`] for segments: those of adapters mapped to `None` are dropped.
pub fn restrict_segments(segments: &[Segment], keep: &[Option<usize>]) -> Vec<Segment> {
    segments
        .iter()
        .filter_map(|s| {
            let adapter = keep.get(s.adapter).copied().flatten()?;
            Some(Segment { adapter, ..*s })
        })
        .collect()
}

/// Inputs a kernel refuses (instead of reading or writing out of bounds).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A buffer is shorter than its dimensions require.
    #[error("{buffer} holds {len} values but {needed} are needed")]
    BufferTooSmall {
        /// Which buffer (`x`, `y`, `t`, `A[i]`, `Bᵀ[i]`).
        buffer: String,
        /// Its length.
        len: usize,
        /// Values required.
        needed: usize,
    },
    /// A quantized product whose `in_features` is not a whole number of 32-weight blocks.
    #[error("{in_features} input features are not whole 32-weight blocks")]
    NotWholeBlocks {
        /// `K`.
        in_features: usize,
    },
    /// A segment reaches past the last row.
    #[error("segment rows {start}..{end} exceed the {rows} rows of the batch")]
    SegmentOutOfRange {
        /// First row.
        start: usize,
        /// One past the last row.
        end: usize,
        /// Rows in the batch.
        rows: usize,
    },
    /// Two segments cover the same row.
    #[error("segments overlap at row {row}")]
    OverlappingSegments {
        /// The first row covered twice.
        row: usize,
    },
    /// A segment or row names an adapter that is not in the list.
    #[error("adapter index {index} but only {count} adapters were given")]
    UnknownAdapter {
        /// The index.
        index: usize,
        /// Adapters given.
        count: usize,
    },
    /// An adapter's rank exceeds the stride of `t`, or is zero.
    #[error("adapter {index} has rank {rank}; ranks must be in 1..={t_stride} (the stride of t)")]
    BadRank {
        /// Adapter index.
        index: usize,
        /// Its rank.
        rank: usize,
        /// Stride of `t`.
        t_stride: usize,
    },
    /// The per-row mapping does not have one entry per row.
    #[error("the row mapping has {len} entries for {rows} rows")]
    MappingLength {
        /// Entries.
        len: usize,
        /// Rows.
        rows: usize,
    },
    /// A row index past the last row of a matrix.
    #[error("row {row} is outside the {rows} rows of the matrix")]
    RowOutOfRange {
        /// The row asked for.
        row: usize,
        /// Rows of the matrix.
        rows: usize,
    },
    /// A product's shape does not match the packed weight it is given.
    #[error(
        "the product needs a [{out_features}, {in_features}] weight, the packed weight is [{rows}, {cols}]"
    )]
    WeightShape {
        /// `N` of the product.
        out_features: usize,
        /// `K` of the product.
        in_features: usize,
        /// Rows of the packed weight.
        rows: usize,
        /// Columns of the packed weight.
        cols: usize,
    },
    /// An output row stride shorter than its rows, so that rows would overlap.
    #[error("output rows of {cols} values with a row stride of {stride} overlap")]
    OverlappingRows {
        /// Values per row.
        cols: usize,
        /// The row stride.
        stride: usize,
    },
    /// A packed operand that does not match its product (shape or instruction set), or a view
    /// outside it.
    #[error("packed operand mismatch: {reason}")]
    PackedOperand {
        /// What does not match.
        reason: String,
    },
    /// A kernel was asked for an instruction set this CPU does not support.
    #[error("this CPU does not support the {isa} kernels")]
    IsaUnavailable {
        /// The instruction set ([`matmul::Isa`] as text).
        isa: String,
    },
}

/// The grouped LoRA matmuls of one projection. Implementations must produce the result of
/// [`reference`](mod@reference) up to floating-point summation order.
pub trait LoraKernels {
    /// Memory holding `f32` values (`[f32]` on the CPU).
    type Buffer: ?Sized;

    /// SGMV shrink: `t[row, :rᵢ] = x[row, :] Aᵢᵀ` for every row of every segment (other entries
    /// of `t` are left alone).
    fn sgmv_shrink(
        &self,
        dims: Dims,
        x: &Self::Buffer,
        segments: &[Segment],
        adapters: &[Factors<'_, Self::Buffer>],
        t: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// SGMV expand: `y[row, :] += t[row, :rᵢ] Bᵢᵀ` for every row of every segment.
    fn sgmv_expand(
        &self,
        dims: Dims,
        t: &Self::Buffer,
        segments: &[Segment],
        adapters: &[Factors<'_, Self::Buffer>],
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// BGMV shrink: like [`LoraKernels::sgmv_shrink`] with one adapter index per row.
    fn bgmv_shrink(
        &self,
        dims: Dims,
        x: &Self::Buffer,
        row_adapters: &[u32],
        adapters: &[Factors<'_, Self::Buffer>],
        t: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// BGMV expand: like [`LoraKernels::sgmv_expand`] with one adapter index per row.
    fn bgmv_expand(
        &self,
        dims: Dims,
        t: &Self::Buffer,
        row_adapters: &[u32],
        adapters: &[Factors<'_, Self::Buffer>],
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Shrink then expand with the given row mapping: `y += x Aᵢᵀ Bᵢᵀ` per row, using `t` as
    /// scratch.
    fn add_lora(
        &self,
        dims: Dims,
        x: &Self::Buffer,
        mapping: RowMapping<'_>,
        adapters: &[Factors<'_, Self::Buffer>],
        t: &mut Self::Buffer,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        match mapping {
            RowMapping::Segments(segments) => {
                self.sgmv_shrink(dims, x, segments, adapters, t)?;
                self.sgmv_expand(dims, t, segments, adapters, y)
            }
            RowMapping::PerRow(rows) => {
                self.bgmv_shrink(dims, x, rows, adapters, t)?;
                self.bgmv_expand(dims, t, rows, adapters, y)
            }
        }
    }
}

/// Checks that each `(buffer, len, needed)` has at least `needed` values.
pub(crate) fn check_lengths(lens: &[(&str, usize, usize)]) -> Result<(), KernelError> {
    for &(buffer, len, needed) in lens {
        if len < needed {
            return Err(KernelError::BufferTooSmall {
                buffer: buffer.to_string(),
                len,
                needed,
            });
        }
    }
    Ok(())
}

/// Checks buffer lengths, ranks and the row mapping of one call on `[f32]` slices; shared by the
/// CPU implementation and the reference.
pub(crate) fn check_call(
    dims: Dims,
    lens: &[(&str, usize, usize)],
    mapping: RowMapping<'_>,
    adapters: &[Factors<'_, [f32]>],
) -> Result<(), KernelError> {
    check_lengths(lens)?;
    for (index, f) in adapters.iter().enumerate() {
        if f.rank == 0 || f.rank > dims.t_stride {
            return Err(KernelError::BadRank {
                index,
                rank: f.rank,
                t_stride: dims.t_stride,
            });
        }
        for (name, len, width) in [
            ("A", f.a.len(), dims.in_features),
            ("Bᵀ", f.b_t.len(), dims.out_features),
        ] {
            let needed = f.rank.saturating_mul(width);
            if len < needed {
                return Err(KernelError::BufferTooSmall {
                    buffer: format!("{name}[{index}]"),
                    len,
                    needed,
                });
            }
        }
    }
    let unknown = |index: usize| KernelError::UnknownAdapter {
        index,
        count: adapters.len(),
    };
    match mapping {
        RowMapping::Segments(segments) => {
            let mut sorted: Vec<&Segment> = segments.iter().collect();
            sorted.sort_by_key(|s| s.start);
            let mut covered_to = 0usize;
            for s in sorted {
                let end = s.start.saturating_add(s.len);
                if end > dims.rows {
                    return Err(KernelError::SegmentOutOfRange {
                        start: s.start,
                        end,
                        rows: dims.rows,
                    });
                }
                if s.len > 0 && s.start < covered_to {
                    return Err(KernelError::OverlappingSegments { row: s.start });
                }
                if s.adapter >= adapters.len() {
                    return Err(unknown(s.adapter));
                }
                covered_to = covered_to.max(end);
            }
        }
        RowMapping::PerRow(rows) => {
            if rows.len() != dims.rows {
                return Err(KernelError::MappingLength {
                    len: rows.len(),
                    rows: dims.rows,
                });
            }
            if let Some(&bad) = rows
                .iter()
                .find(|&&i| i != NO_ADAPTER && i as usize >= adapters.len())
            {
                return Err(unknown(bad as usize));
            }
        }
    }
    Ok(())
}

/// Buffer-length requirements of a shrink (`x` read, `t` written).
pub(crate) fn shrink_lens(dims: Dims, x: usize, t: usize) -> [(&'static str, usize, usize); 2] {
    [
        ("x", x, dims.rows.saturating_mul(dims.in_features)),
        ("t", t, dims.rows.saturating_mul(dims.t_stride)),
    ]
}

/// Buffer-length requirements of an expand (`t` read, `y` updated).
pub(crate) fn expand_lens(dims: Dims, t: usize, y: usize) -> [(&'static str, usize, usize); 2] {
    [
        ("t", t, dims.rows.saturating_mul(dims.t_stride)),
        ("y", y, dims.rows.saturating_mul(dims.out_features)),
    ]
}
