//! `y = x Wᵀ` for the rows of a decode step with `W` kept as GGML blocks (Q4_0, Q4_1, Q8_0) and
//! `x` in f32: `x: [M, K]`, `W: [N, K]` (K / 32 blocks per row, as a GGUF file stores them),
//! `y: [M, N]`.
//!
//! Unlike GGML's (and candle's) quantized matmul, the activations are not rounded to 8 bits per
//! block, which moved SmolLM2-135M Q4_1's answers away from the dequantized model's (llama.cpp
//! on the same file answers the capital-of-France question with "L'Étoile, la Marseillaise").
//! `W` rows are taken 4 at a time. With a few rows of `x` (a decode step), blocks are decoded in
//! registers: each block of `x` is first rounded to 16-bit levels of a common scale (2^-16 of the
//! block's largest value, 256 times finer than 8 bits; see [`Activations`]), the weight levels
//! meet them in exact integer multiply-adds, and each block's sum is scaled once (`d Σ q x +
//! m Σ x`, with the exact f32 block sums of `x`). With more rows, groups of 16 `W` rows are
//! dequantized (`d q + m`, the same f32 values a full dequantization gives) into a buffer that
//! the dense kernel of [`crate::matmul`] reads for every row of `x`: that product is the
//! dequantized model's up to f32 summation order. `N` is split into ranges that run in parallel
//! on the rayon pool, as the dense kernel's are. AVX2 (with FMA and F16C) when the CPU has it,
//! portable code otherwise (dequantized weights in f32 throughout).

use rayon::prelude::*;

use crate::matmul::{split_columns, w_ranges};
use crate::{KernelError, Shape};

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

/// Weights per block.
pub const BLOCK: usize = 32;

/// `W` rows taken together.
const NR: usize = 4;

/// Up to this many rows of `x`, blocks are decoded in registers for each row; above, groups of
/// [`DENSE_GROUP`] `W` rows are dequantized once into a buffer and multiplied by the dense
/// kernel of [`crate::matmul`].
const DIRECT_MAX_ROWS: usize = 3;

/// `W` rows dequantized together for the dense kernel (16 × 5632 f32 is 352 KiB: L2).
const DENSE_GROUP: usize = 16;

/// A GGML block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// `d: f16, qs: [u8; 16]`: weight `j` is `d (q_j - 8)`, `q_j` the low nibble of `qs[j]`
    /// for `j < 16`, the high nibble of `qs[j - 16]` after.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`: weight `j` is `d q_j + m` (nibbles as Q4_0).
    Q4_1,
    /// `d: f16, qs: [i8; 32]`: weight `j` is `d qs[j]`.
    Q8_0,
}

impl QFormat {
    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// The block's scale and offset: weight `j` is `d * q_j + m` for the levels `q_j` that
    /// [`QFormat::levels`] gives.
    fn scale(self, block: &[u8]) -> (f32, f32) {
        let d = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
        match self {
            Self::Q4_0 => (d, -8.0 * d),
            Self::Q4_1 => (d, f16_to_f32(u16::from_le_bytes([block[2], block[3]]))),
            Self::Q8_0 => (d, 0.0),
        }
    }

    /// The 32 integer levels of a block, as f32.
    fn levels(self, block: &[u8], q: &mut [f32; BLOCK]) {
        match self {
            Self::Q4_0 | Self::Q4_1 => {
                let qs = &block[self.block_bytes() - 16..];
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0f) as f32;
                    q[j + 16] = (qs[j] >> 4) as f32;
                }
            }
            Self::Q8_0 => {
                for (v, b) in q.iter_mut().zip(&block[2..34]) {
                    *v = *b as i8 as f32;
                }
            }
        }
    }
}

/// Dequantizes one row of blocks (`row.len()` a multiple of the block size) into `out`
/// (`d q + m`, one f32 per weight), as a full dequantization does (an embedding lookup).
pub fn dequantize_row(format: QFormat, row: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let bb = format.block_bytes();
    crate::check_lengths(&[("out", out.len(), row.len() / bb * BLOCK)])?;
    if !row.len().is_multiple_of(bb) {
        return Err(KernelError::NotWholeBlocks {
            in_features: row.len(),
        });
    }
    let mut q = [0f32; BLOCK];
    for (block, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        let (d, off) = format.scale(block);
        format.levels(block, &mut q);
        for (o, q) in out.iter_mut().zip(&q) {
            *o = q.mul_add(d, off);
        }
    }
    Ok(())
}

/// One row of `x` as the AVX2 direct kernel reads it: each block of 32 values rounded to 16-bit
/// levels of a common scale (`max |x| / 32767`, so every value is off by at most `max |x| /
/// 65534`, 2^-16 of the block's largest), with the block's exact f32 sum (for the offsets, `m Σ
/// x`). Integer multiply-adds of weight levels and these levels are exact, so this rounding is
/// the kernel's only departure from f32 (GGML rounds `x` to 8 bits).
pub(crate) struct Activations {
    levels: Vec<i16>,
    /// Per block: the scale of its levels, and the exact f32 sum of its values.
    pairs: Vec<ScaleSum>,
}

/// A block's (scale, sum), 8-byte aligned: the kernel broadcasts the pair as one 64-bit value.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct ScaleSum([f32; 2]);

impl Activations {
    /// Prepares one row (`x.len()` a multiple of 32). Non-finite values give non-finite
    /// scales, so they reach the outputs as they would in f32.
    fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut out = Self {
            levels: vec![0; x.len()],
            pairs: Vec::with_capacity(blocks),
        };
        for (block, levels) in x
            .chunks_exact(BLOCK)
            .zip(out.levels.chunks_exact_mut(BLOCK))
        {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let nonfinite = block.iter().any(|v| !v.is_finite());
            let scale = if nonfinite { f32::NAN } else { amax / 32767.0 };
            if amax > 0.0 && !nonfinite {
                let inv = 32767.0 / amax;
                for (l, v) in levels.iter_mut().zip(block) {
                    // Round half away from zero (`as` truncates; inlined, unlike `round`).
                    let t = v * inv;
                    *l = (t + 0.5f32.copysign(t)) as i16;
                }
            }
            out.pairs.push(ScaleSum([scale, block.iter().sum()]));
        }
        out
    }
}

/// An IEEE half to f32 (normals, subnormals, infinities and NaN), exactly.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // Zero or subnormal: frac · 2^-24, exact in f32.
            let v = frac as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (frac << 13)),
        e => f32::from_bits(sign | ((e + 112) << 23) | (frac << 13)),
    }
}

/// `y = x Wᵀ` (see the module docs); the instruction set is chosen at run time.
pub fn qmatmul_nt(
    shape: Shape,
    x: &[f32],
    w: &[u8],
    format: QFormat,
    y: &mut [f32],
) -> Result<(), KernelError> {
    qmatmul_nt_with(true, shape, x, w, format, y)
}

/// [`qmatmul_nt`], with the AVX2 kernel allowed or not (tests compare them).
pub fn qmatmul_nt_with(
    simd: bool,
    shape: Shape,
    x: &[f32],
    w: &[u8],
    format: QFormat,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    if k % BLOCK != 0 {
        return Err(KernelError::NotWholeBlocks { in_features: k });
    }
    let row_bytes = k / BLOCK * format.block_bytes();
    crate::check_lengths(&[
        ("x", x.len(), m.saturating_mul(k)),
        ("W", w.len(), n.saturating_mul(row_bytes)),
        ("y", y.len(), m.saturating_mul(n)),
    ])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = simd && x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, _) = (false, simd);
    let acts: Vec<Activations> = if avx2 && m <= DIRECT_MAX_ROWS {
        x.chunks_exact(k).map(Activations::new).collect()
    } else {
        Vec::new()
    };
    let kernel = Kernel {
        format,
        m,
        k,
        row_bytes,
        x,
        acts: &acts,
        avx2,
    };
    let ranges = w_ranges(shape, true);
    let parts = split_columns(y, m, n, &ranges);
    let job = |(&(a, b), mut ys): (&(usize, usize), Vec<&mut [f32]>)| {
        kernel.range(&w[a * row_bytes..b * row_bytes], &mut ys);
    };
    if ranges.len() == 1 {
        ranges.iter().zip(parts).for_each(job);
    } else {
        ranges.par_iter().zip(parts).for_each(job);
    }
    Ok(())
}

/// One call's operands.
struct Kernel<'a> {
    format: QFormat,
    m: usize,
    k: usize,
    row_bytes: usize,
    x: &'a [f32],
    /// The rows of `x` prepared for the AVX2 direct kernel (empty otherwise).
    acts: &'a [Activations],
    avx2: bool,
}

impl Kernel<'_> {
    /// `ys[r][j] = x[r] · w[j]` for the `W` rows `w` of one range.
    fn range(&self, w: &[u8], ys: &mut [&mut [f32]]) {
        let rows: Vec<&[u8]> = w.chunks_exact(self.row_bytes).collect();
        if self.m <= DIRECT_MAX_ROWS {
            self.range_direct(&rows, ys);
        } else {
            self.range_dense(&rows, ys);
        }
    }

    /// Blocks decoded for every row of `x`, 4 `W` rows at a time.
    fn range_direct(&self, rows: &[&[u8]], ys: &mut [&mut [f32]]) {
        for (g, group) in rows.chunks(NR).enumerate() {
            // The last group repeats its last row to fill NR; those results are dropped.
            let pick: [&[u8]; NR] = std::array::from_fn(|i| group[i.min(group.len() - 1)]);
            for (r, y) in ys.iter_mut().enumerate() {
                let out = self.direct(pick, r);
                y[g * NR..g * NR + group.len()].copy_from_slice(&out[..group.len()]);
            }
        }
    }

    /// Groups of `W` rows dequantized once, then the dense kernel over every row of `x`.
    fn range_dense(&self, rows: &[&[u8]], ys: &mut [&mut [f32]]) {
        let (m, k) = (self.m, self.k);
        let mut scratch = vec![0f32; DENSE_GROUP * k];
        let mut out = vec![0f32; m * DENSE_GROUP];
        for (g, group) in rows.chunks(DENSE_GROUP).enumerate() {
            for (q, quad) in group.chunks(NR).enumerate() {
                let pick: [&[u8]; NR] = std::array::from_fn(|i| quad[i.min(quad.len() - 1)]);
                self.dequantize_rows(pick, &mut scratch[q * NR * k..(q * NR + NR) * k]);
            }
            let n = group.len();
            let shape = Shape {
                rows: m,
                in_features: k,
                out_features: n,
            };
            crate::matmul::matmul_nt_serial(shape, self.x, &scratch[..n * k], &mut out[..m * n])
                .expect("sizes checked by qmatmul_nt");
            for (r, y) in ys.iter_mut().enumerate() {
                let at = g * DENSE_GROUP;
                y[at..at + n].copy_from_slice(&out[r * n..(r + 1) * n]);
            }
        }
    }

    /// `x[r] · W[w]` for the 4 rows `rows`.
    fn direct(&self, rows: [&[u8]; NR], r: usize) -> [f32; NR] {
        let k = self.k;
        let x = &self.x[r * k..(r + 1) * k];
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `available()` checked AVX2, FMA and F16C; the rows and the prepared
            // activations have the call's sizes.
            return unsafe { x86::direct(self.format, rows, &self.acts[r], k) };
        }
        self.direct_portable(rows, x)
    }

    fn direct_portable(&self, rows: [&[u8]; NR], x: &[f32]) -> [f32; NR] {
        let k = self.k;
        let mut scratch = vec![0f32; NR * k];
        self.dequantize_rows(rows, &mut scratch);
        std::array::from_fn(|w| {
            scratch[w * k..(w + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
    }

    /// Dequantizes `rows` into `scratch` (`[NR, k]`).
    fn dequantize_rows(&self, rows: [&[u8]; NR], scratch: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `available()` checked AVX2, FMA and F16C; sizes as the call's.
            return unsafe { x86::dequantize_rows(self.format, rows, self.k, scratch) };
        }
        for (row, out) in rows.iter().zip(scratch.chunks_exact_mut(self.k)) {
            dequantize_row(self.format, row, out).expect("sizes checked by qmatmul_nt");
        }
    }
}
