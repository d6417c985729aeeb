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
pub mod testing {
    //! Deterministic inputs for the tests and benchmarks of the kernels.

    /// `n` deterministic values in [-1, 1) from `seed` (a small LCG; no dependency needed).
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A decode table of `rows` rows over 4 adapters where adapter 0 takes 4 rows of every 9
    /// (more rows than the grouped kernels accumulate at once) and every 9th row has none.
    pub fn heavy_decode_table(rows: u32) -> Vec<u32> {
        (0..rows)
            .map(|r| match r % 9 {
                0 => crate::NO_ADAPTER,
                k if k < 5 => 0,
                k => k % 4,
            })
            .collect()
    }

    /// Random LoRA factors for adapters of `ranks` over `in_features` → `out_features`, scaled
    /// like a trained adapter's (`|x Aᵀ Bᵀ|` of order 1 for `x` in [-1, 1)): `(A, scale · Bᵀ)`
    /// per adapter, `A` from seed `seed + 10 + k`, `Bᵀ` from `seed + 20 + k`.
    pub fn adapter_factors(
        ranks: &[usize],
        in_features: usize,
        out_features: usize,
        seed: u64,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        let scaled = |v: Vec<f32>, fan_in: usize| -> Vec<f32> {
            let s = 1.0 / (fan_in as f32).sqrt();
            v.into_iter().map(|e| e * s).collect()
        };
        ranks
            .iter()
            .enumerate()
            .map(|(k, &r)| {
                (
                    scaled(values(r * in_features, seed + 10 + k as u64), in_features),
                    scaled(values(r * out_features, seed + 20 + k as u64), r),
                )
            })
            .collect()
    }

    /// `y0` plus the LoRA of `x` by `factors` (from [`adapter_factors`], of `ranks`) under
    /// `mapping`, by the reference loops (`crate::reference`).
    pub fn reference_output(
        dims: crate::Shape,
        x: &[f32],
        y0: &[f32],
        mapping: crate::RowMapping<'_>,
        ranks: &[usize],
        factors: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<Vec<f32>, crate::KernelError> {
        let refs: Vec<crate::Factors<'_, [f32]>> = factors
            .iter()
            .zip(ranks)
            .map(|((a, b), &rank)| crate::Factors {
                rank,
                a: a.as_slice(),
                b_t: b.as_slice(),
            })
            .collect();
        let dims = crate::Dims {
            rows: dims.rows,
            in_features: dims.in_features,
            out_features: dims.out_features,
            t_stride: ranks.iter().copied().max().unwrap_or(1),
        };
        let mut y = y0.to_vec();
        crate::reference::add_lora(dims, x, mapping, &refs, &mut y)?;
        Ok(y)
    }

    /// [`adapter_factors`] for each of several projections side by side (`widths`): entry
    /// `[p][i]` holds adapter `i`'s factors for part `p`, of rank `ranks[i][p]` (empty for 0).
    pub fn part_factors(
        ranks: &[Vec<usize>],
        in_features: usize,
        widths: &[usize],
        seed: u64,
    ) -> Vec<Vec<(Vec<f32>, Vec<f32>)>> {
        widths
            .iter()
            .enumerate()
            .map(|(p, &width)| {
                let part: Vec<usize> = ranks.iter().map(|r| r[p]).collect();
                adapter_factors(&part, in_features, width, seed + 100 * p as u64)
            })
            .collect()
    }

    /// `y0` plus the LoRA of several projections whose outputs sit side by side in `y`
    /// (`widths`, in order; `[rows, Σ widths]`), each by the reference loops over the adapters
    /// with factors for it (`ranks[i][p] > 0`, factors `factors[p][i]` from
    /// [`adapter_factors`]); and whether each element of `y` gets a product (the others must
    /// keep their values).
    #[allow(clippy::too_many_arguments)]
    pub fn reference_parts(
        rows: usize,
        in_features: usize,
        widths: &[usize],
        x: &[f32],
        y0: &[f32],
        mapping: crate::RowMapping<'_>,
        ranks: &[Vec<usize>],
        factors: &[Vec<(Vec<f32>, Vec<f32>)>],
    ) -> Result<(Vec<f32>, Vec<bool>), crate::KernelError> {
        let out: usize = widths.iter().sum();
        let (mut want, mut touched) = (y0.to_vec(), vec![false; rows * out]);
        let adapter_of = crate::reference::row_adapters(rows, mapping);
        let mut start = 0;
        for (p, &width) in widths.iter().enumerate() {
            // The adapters with factors for this part, renumbered, and the rows of the others
            // dropped from the mapping.
            let (mut keep, mut part_ranks, mut part_factors) = (Vec::new(), Vec::new(), Vec::new());
            for (i, r) in ranks.iter().enumerate() {
                keep.push((r[p] > 0).then_some(part_ranks.len()));
                if r[p] > 0 {
                    part_ranks.push(r[p]);
                    part_factors.push(factors[p][i].clone());
                }
            }
            let (table, segments): (Vec<u32>, Vec<crate::Segment>) = match mapping {
                crate::RowMapping::PerRow(t) => (
                    t.iter()
                        .map(|&a| match keep.get(a as usize).copied().flatten() {
                            Some(k) if a != crate::NO_ADAPTER => k as u32,
                            _ => crate::NO_ADAPTER,
                        })
                        .collect(),
                    Vec::new(),
                ),
                crate::RowMapping::Segments(s) => (
                    Vec::new(),
                    s.iter()
                        .filter_map(|s| {
                            keep[s.adapter].map(|adapter| crate::Segment { adapter, ..*s })
                        })
                        .collect(),
                ),
            };
            let part_mapping = match mapping {
                crate::RowMapping::PerRow(_) => crate::RowMapping::PerRow(&table),
                crate::RowMapping::Segments(_) => crate::RowMapping::Segments(&segments),
            };
            let columns: Vec<f32> = (0..rows)
                .flat_map(|r| y0[r * out + start..r * out + start + width].to_vec())
                .collect();
            let shape = crate::Shape {
                rows,
                in_features,
                out_features: width,
            };
            let part =
                reference_output(shape, x, &columns, part_mapping, &part_ranks, &part_factors)?;
            for &(r, a) in &adapter_of {
                if ranks[a][p] > 0 {
                    let (dst, src) = (r * out + start, r * width);
                    want[dst..dst + width].copy_from_slice(&part[src..src + width]);
                    touched[dst..dst + width].fill(true);
                }
            }
            start += width;
        }
        Ok((want, touched))
    }

    /// Median seconds of `f(i)` over calls cycling `i` through `copies` weight copies (at least
    /// 7 calls and about a quarter of a second), after one untimed call: the benchmarks' timer.
    pub fn median_s(copies: usize, mut f: impl FnMut(usize)) -> f64 {
        f(0);
        let mut t = Vec::new();
        let start = std::time::Instant::now();
        let mut i = 1;
        while t.len() < 7 || (start.elapsed().as_secs_f64() < 0.25 && t.len() < 400) {
            let s = std::time::Instant::now();
            f(i % copies);
            t.push(s.elapsed().as_secs_f64());
            i += 1;
        }
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
}

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
