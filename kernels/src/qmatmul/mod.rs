//! `y = x Wᵀ` for the rows of a decode step with `W` kept as GGML blocks (Q4_0, Q4_1, Q8_0) and
//! `x` in f32: `x: [M, K]`, `W: [N, K]` (K / 32 blocks per row, as a GGUF file stores them),
//! `y: [M, N]`.
//!
//! Unlike GGML's (and candle's) quantized matmul, the activations are not rounded to 8 bits per
//! block, which moved SmolLM2-135M Q4_1's answers away from the dequantized model's (llama.cpp
//! on the same file answers the capital-of-France question with "L'Étoile, la Marseillaise").
//! `W` rows are taken 4 at a time. With a few rows of `x` (a decode step), blocks are decoded in
//! registers: each block of `x` is first rounded to 16-bit levels of a common scale (2^-16 of the
//! block's largest value, 256 times finer than 8 bits; see `Activations`), the weight levels
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

mod packed;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use packed::Packed;

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
}

/// One row of `x` as the AVX2 direct kernel reads it: each block of 32 values rounded to 16-bit
/// levels of a common scale (`max |x| / 32767`, so every value is off by at most `max |x| /
/// 65534`, 2^-16 of the block's largest), with the block's exact f32 sum (for the offsets, `m Σ
/// x`). Integer multiply-adds of weight levels and these levels are exact, so this rounding is
/// the kernel's only departure from f32 (GGML rounds `x` to 8 bits).
///
/// The levels of a block are laid out in the kernel's 16-bit lanes ([`lanes`]), so that the
/// weights are unpacked with in-lane shifts and masks rather than widening shuffles.
pub(crate) struct Activations {
    /// Per block, `lanes(format).len()` levels.
    levels: Vec<i16>,
    /// Per block, what the 4 rows' converted scales (see `x86.rs`) are multiplied by:
    /// Q4_0 `[dx ×4, -8 Σx ×4]` (scales `[d0 d1 d2 d3 d0 d1 d2 d3]`), Q4_1 `[dx, Σx] ×4`
    /// (scales `[d0 m0 d1 m1 d2 m2 d3 m3]`), Q8_0 `[dx ×4, 0 ×4]`; `dx` is the block's level
    /// scale, `Σx` the exact f32 sum of its values.
    scales: Vec<Lanes8>,
}

/// Eight f32 lanes, aligned for a 256-bit load.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Lanes8([f32; 8]);

/// For each 16-bit lane in which the AVX2 direct kernel holds a block's `x` levels, the index
/// of the weight it meets.
///
/// * Q4_0 / Q4_1 (64 lanes, 4 registers): a 256-bit load takes two rows' 16 level bytes, and
///   each 16-bit lane (bytes `2t`, `2t + 1` of a row) gives, masked or shifted by 4, 8 and 12
///   bits, the low nibble of byte `2t` (weight `2t`), its high nibble (`16 + 2t`), the low
///   nibble of byte `2t + 1` (`2t + 1`) and its high nibble (`17 + 2t`). Each register holds
///   those 8 weights for both rows, so its 8 levels are repeated.
/// * Q8_0 (32 lanes, 2 registers): a row's 32 level bytes as 16-bit lanes, sign-extended from
///   their low byte (weight `2t`) and from their high byte (`2t + 1`).
pub(crate) fn lanes(format: QFormat) -> &'static [usize] {
    match format {
        QFormat::Q4_0 | QFormat::Q4_1 => &Q4_LANES,
        QFormat::Q8_0 => &Q8_LANES,
    }
}

/// [`lanes`] of the 4-bit formats.
static Q4_LANES: [usize; 64] = {
    let mut out = [0; 64];
    let mut lane = 0;
    while lane < 64 {
        let (reg, t) = (lane / 16, lane % 8);
        out[lane] = [2 * t, 16 + 2 * t, 2 * t + 1, 17 + 2 * t][reg];
        lane += 1;
    }
    out
};

/// [`lanes`] of Q8_0.
static Q8_LANES: [usize; 32] = {
    let mut out = [0; 32];
    let mut lane = 0;
    while lane < 32 {
        out[lane] = 2 * (lane % 16) + lane / 16;
        lane += 1;
    }
    out
};

impl Activations {
    /// Prepares one row (`x.len()` a multiple of 32) for blocks of `format`. Non-finite values
    /// give non-finite scales, so they reach the outputs as they would in f32.
    fn new(x: &[f32], format: QFormat) -> Self {
        let lanes = lanes(format);
        let blocks = x.len() / BLOCK;
        let mut out = Self {
            levels: vec![0; blocks * lanes.len()],
            scales: Vec::with_capacity(blocks),
        };
        for (block, levels) in x
            .chunks_exact(BLOCK)
            .zip(out.levels.chunks_exact_mut(lanes.len()))
        {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let nonfinite = block.iter().any(|v| !v.is_finite());
            let dx = if nonfinite { f32::NAN } else { amax / 32767.0 };
            if amax > 0.0 && !nonfinite {
                let inv = 32767.0 / amax;
                // Round half away from zero (`as` truncates; inlined, unlike `round`).
                let natural: [i16; BLOCK] = std::array::from_fn(|j| {
                    let t = block[j] * inv;
                    (t + 0.5f32.copysign(t)) as i16
                });
                for (l, &j) in levels.iter_mut().zip(lanes) {
                    *l = natural[j];
                }
            }
            let sum: f32 = block.iter().sum();
            out.scales.push(Lanes8(match format {
                QFormat::Q4_0 => [
                    dx,
                    dx,
                    dx,
                    dx,
                    -8.0 * sum,
                    -8.0 * sum,
                    -8.0 * sum,
                    -8.0 * sum,
                ],
                QFormat::Q4_1 => [dx, sum, dx, sum, dx, sum, dx, sum],
                QFormat::Q8_0 => [dx, dx, dx, dx, 0.0, 0.0, 0.0, 0.0],
            }));
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
pub fn qmatmul_nt(shape: Shape, x: &[f32], w: &Packed, y: &mut [f32]) -> Result<(), KernelError> {
    qmatmul_nt_with(true, shape, x, w, y)
}

/// [`qmatmul_nt`], with the AVX2 kernel allowed or not (tests compare them).
pub fn qmatmul_nt_with(
    simd: bool,
    shape: Shape,
    x: &[f32],
    w: &Packed,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    if (n, k) != (w.rows(), w.cols()) {
        return Err(KernelError::WeightShape {
            out_features: n,
            in_features: k,
            rows: w.rows(),
            cols: w.cols(),
        });
    }
    crate::check_lengths(&[
        ("x", x.len(), m.saturating_mul(k)),
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
        x.chunks_exact(k)
            .map(|x| Activations::new(x, w.format()))
            .collect()
    } else {
        Vec::new()
    };
    let kernel = Kernel {
        w,
        m,
        x,
        acts: &acts,
        avx2,
    };
    // Range starts are multiples of the dense kernel's row tile, itself a multiple of NR.
    let ranges = w_ranges(shape, true);
    let parts = split_columns(y, m, n, &ranges);
    let job = |(&(a, b), mut ys): (&(usize, usize), Vec<&mut [f32]>)| {
        kernel.range(a / NR, b.div_ceil(NR), &mut ys);
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
    w: &'a Packed,
    m: usize,
    x: &'a [f32],
    /// The rows of `x` prepared for the AVX2 direct kernel (empty otherwise).
    acts: &'a [Activations],
    avx2: bool,
}

impl Kernel<'_> {
    /// `ys[r][j] = x[r] · w[j]` for the groups `a..b` of `W` (`ys[r][0]` is row `NR a`).
    fn range(&self, a: usize, b: usize, ys: &mut [&mut [f32]]) {
        if self.m <= DIRECT_MAX_ROWS {
            self.range_direct(a, b, ys);
        } else {
            self.range_dense(a, b, ys);
        }
    }

    /// Blocks decoded for every row of `x`, a group of `NR` `W` rows at a time.
    fn range_direct(&self, a: usize, b: usize, ys: &mut [&mut [f32]]) {
        let groups = self.w.groups(a, b);
        let gb = self.w.group_bytes();
        for (g, group) in groups.chunks_exact(gb).enumerate() {
            for (r, y) in ys.iter_mut().enumerate() {
                let out = self.direct(group, r);
                // The last group may repeat its last row; those results are dropped.
                let at = g * NR;
                let len = (y.len() - at).min(NR);
                y[at..at + len].copy_from_slice(&out[..len]);
            }
        }
    }

    /// Groups of `W` rows dequantized once, then the dense kernel over every row of `x`.
    fn range_dense(&self, a: usize, b: usize, ys: &mut [&mut [f32]]) {
        let (m, k) = (self.m, self.w.cols());
        let per = DENSE_GROUP / NR;
        let gb = self.w.group_bytes();
        let mut scratch = vec![0f32; DENSE_GROUP * k];
        let mut out = vec![0f32; m * DENSE_GROUP];
        let total = ys.first().map_or(0, |y| y.len());
        for (c, chunk) in self.w.groups(a, b).chunks(per * gb).enumerate() {
            for (q, group) in chunk.chunks_exact(gb).enumerate() {
                self.dequantize_group(group, &mut scratch[q * NR * k..(q + 1) * NR * k]);
            }
            let at = c * DENSE_GROUP;
            let n = (total - at).min(DENSE_GROUP);
            let shape = Shape {
                rows: m,
                in_features: k,
                out_features: n,
            };
            crate::matmul::matmul_nt_serial(shape, self.x, &scratch[..n * k], &mut out[..m * n])
                .expect("sizes checked by qmatmul_nt");
            for (r, y) in ys.iter_mut().enumerate() {
                y[at..at + n].copy_from_slice(&out[r * n..(r + 1) * n]);
            }
        }
    }

    /// `x[r] · W[w]` for the `NR` rows of one group.
    fn direct(&self, group: &[u8], r: usize) -> [f32; NR] {
        let k = self.w.cols();
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `available()` checked AVX2, FMA and F16C; the group and the prepared
            // activations have the call's sizes.
            return unsafe { x86::direct(self.w.format(), group, &self.acts[r], k) };
        }
        let x = &self.x[r * k..(r + 1) * k];
        let mut scratch = vec![0f32; NR * k];
        self.dequantize_group(group, &mut scratch);
        std::array::from_fn(|i| {
            scratch[i * k..(i + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
    }

    /// Dequantizes the `NR` rows of `group` into `scratch` (`[NR, k]`).
    fn dequantize_group(&self, group: &[u8], scratch: &mut [f32]) {
        dequantize_group(self.avx2, self.w, group, scratch);
    }
}

/// Dequantizes the `NR` rows of `group` (one of `w`'s) into `scratch` (`[NR, cols]`).
fn dequantize_group(avx2: bool, w: &Packed, group: &[u8], scratch: &mut [f32]) {
    let (format, k) = (w.format(), w.cols());
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `available()` checked AVX2, FMA and F16C; a group of `w` and NR k floats.
        return unsafe { x86::dequantize_group(format, group, k, scratch) };
    }
    let _ = avx2;
    for (i, out) in scratch.chunks_exact_mut(k).enumerate() {
        packed::dequantize_group_row(format, group, i, out);
    }
}

impl Packed {
    /// The whole matrix dequantized (`[rows, cols]`, `d q + m`: what a full dequantization of
    /// the GGML blocks gives), on the rayon pool.
    pub fn dequantize(&self) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        let avx2 = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let (k, groups) = (self.cols(), self.rows().div_ceil(NR));
        let mut out = vec![0f32; groups * NR * k];
        if k > 0 {
            out.par_chunks_mut(NR * k)
                .zip(self.groups(0, groups).par_chunks(self.group_bytes()))
                .for_each(|(out, group)| dequantize_group(avx2, self, group, out));
        }
        out.truncate(self.rows() * k);
        out
    }
}
