//! The AVX2 + FMA (+ F16C) kernels of [`super::qmatmul_nt`], over groups of 4 `W` rows
//! (independent accumulation chains).
//!
//! The direct kernel (a few rows of `x`: a decode step is bound by decoding the blocks) meets
//! the weight levels, widened to 16 bits straight from memory (`vpmovzxbw`/`vpmovsxbw`), with
//! `x`'s 16-bit levels ([`super::Activations`]) in `vpmaddwd` (exact integer sums), converts each
//! block's sum once and scales it by `d` times `x`'s block scale. The 4 rows' `(d, m)` halves are
//! converted together (one `vcvtph2ps`) and multiplied by `x`'s block (scale, sum) pair, which
//! gives each row's block scale and its offset term at once (`Σ (d q + m) x = d Σ q x + m Σ x`).
//! The group after next is prefetched. The dense path stores the exactly dequantized weights
//! (`d q + m`) into the scratch buffer the dense kernel reads.
//!
//! The format is a const parameter so that each kernel is compiled for one block layout, and no
//! closures are used inside the `target_feature` functions (they would not inherit the features).

use std::arch::x86_64::*;

use super::{Activations, BLOCK, NR, QFormat};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// Whether this CPU has AVX2, FMA and F16C.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The sum of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// How many groups of `NR` rows ahead the direct kernel prefetches: the rows of `W` are
/// contiguous, so the same block of the group after next is `2 NR` row lengths ahead. A decode
/// step reads the weights once from DRAM with little else to overlap; the hardware prefetcher
/// alone (or a fixed distance of 1 KiB) left two cores at about 6 GB/s, this at about 10.
const PREFETCH_GROUPS: usize = 2;

/// Where a block's levels start.
const fn levels_at(f: u8) -> usize {
    if f == Q4_1 { 4 } else { 2 }
}

/// A block's 32 integer levels as four f32 vectors (weights 0-7, 8-15, 16-23, 24-31): for the
/// 4-bit formats, the low nibbles of bytes 0-7 and 8-15, then their high nibbles.
///
/// # Safety
/// `qs` points at the block's levels (16 bytes for the 4-bit formats, 32 for Q8_0).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn levels<const F: u8>(qs: *const u8) -> [__m256; 4] {
    // SAFETY: the caller's contract.
    unsafe {
        let load = |j: usize| _mm_loadl_epi64(qs.add(8 * j).cast());
        if F == Q8_0 {
            [0, 1, 2, 3].map(|j| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load(j))))
        } else {
            let mask = _mm256_set1_epi32(0x0f);
            let a = _mm256_cvtepu8_epi32(load(0));
            let b = _mm256_cvtepu8_epi32(load(1));
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(a, mask)),
                _mm256_cvtepi32_ps(_mm256_and_si256(b, mask)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)),
            ]
        }
    }
}

/// The 4 bytes at `at` of each of the 4 rows as f16 pairs, in f32: `[d0 m0 d1 m1 d2 m2 d3 m3]`
/// for Q4_1 (`d`, `m`); for the other formats the odd lanes hold the first level bytes (unused).
///
/// # Safety
/// Every row holds at least `at + 4` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pairs4(rows: &[&[u8]; NR], at: usize) -> __m256 {
    // SAFETY: the caller's contract.
    let w = |i: usize| unsafe { rows[i].as_ptr().add(at).cast::<u32>().read_unaligned() as u64 };
    let lo = w(0) | (w(1) << 32);
    let hi = w(2) | (w(3) << 32);
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn direct_f<const F: u8>(bb: usize, rows: [&[u8]; NR], x: &Activations, k: usize) -> [f32; NR] {
    let ahead = PREFETCH_GROUPS * NR * (k / BLOCK) * bb;
    let mut acc = [_mm256_setzero_ps(); NR];
    // Lane 2i + 1 accumulates row i's offset term `Σ m Σx` (even lanes are unused).
    let mut acc_m = _mm256_setzero_ps();
    let low = _mm256_set1_epi16(0x0f);
    // Q4_0's offset is -8 d.
    let offset = _mm256_setr_ps(1.0, -8.0, 1.0, -8.0, 1.0, -8.0, 1.0, -8.0);
    let lane = |i: i32| _mm256_set1_epi32(2 * i);
    let picks = [lane(0), lane(1), lane(2), lane(3)];
    for b in 0..k / BLOCK {
        let at = b * bb;
        // SAFETY: every row holds k / 32 blocks of bb (>= 18) bytes; x holds k levels and
        // k / 32 (scale, sum) pairs.
        unsafe {
            let dm = pairs4(&rows, at);
            // [dx, Σx] of x's block, in every pair of lanes.
            // (ScaleSum is 8-byte aligned, so the pair reads as one f64.)
            let pair: *const f64 = x.pairs.as_ptr().add(b).cast();
            let xs = _mm256_castpd_ps(_mm256_broadcast_sd(&*pair));
            // [d dx, m Σx] per row.
            let v = match F {
                Q4_1 => _mm256_mul_ps(dm, xs),
                Q4_0 => _mm256_mul_ps(_mm256_mul_ps(_mm256_moveldup_ps(dm), xs), offset),
                _ => _mm256_mul_ps(_mm256_moveldup_ps(dm), xs),
            };
            if F != Q8_0 {
                acc_m = _mm256_add_ps(acc_m, v);
            }
            for row in &rows {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(at + ahead).cast());
            }
            let xq = x.levels.as_ptr().add(b * BLOCK);
            let x_lo = _mm256_loadu_si256(xq.cast());
            let x_hi = _mm256_loadu_si256(xq.add(16).cast());
            for i in 0..NR {
                let qs = rows[i].as_ptr().add(at + levels_at(F));
                // Weights 0-15 and 16-31 as 16-bit levels.
                let (w_lo, w_hi) = if F == Q8_0 {
                    (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.add(16).cast())),
                    )
                } else {
                    let raw = _mm256_cvtepu8_epi16(_mm_loadu_si128(qs.cast()));
                    (_mm256_and_si256(raw, low), _mm256_srli_epi16(raw, 4))
                };
                // Exact in i32 (|Σ q x| ≤ 32 · 128 · 32767), and in f32 for the 4-bit formats
                // (32 · 15 · 32767 < 2^24).
                let p =
                    _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
                let ds = _mm256_permutevar8x32_ps(v, picks[i]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, acc[i]);
            }
        }
    }
    let mut m = [0f32; 8];
    // SAFETY: m holds 8 floats.
    unsafe { _mm256_storeu_ps(m.as_mut_ptr(), acc_m) };
    [0, 1, 2, 3].map(|i| hsum(acc[i]) + m[2 * i + 1])
}

/// `out[w] = x · W[w]` for 4 rows of `W`, decoding every block against `x`'s 16-bit levels.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every row holds `k / 32` blocks; `x` holds `k`
/// levels, `k / 32` scales and, for the 4-bit formats, `k / 32` sums.
pub(super) unsafe fn direct(
    format: QFormat,
    rows: [&[u8]; NR],
    x: &Activations,
    k: usize,
) -> [f32; NR] {
    let bb = format.block_bytes();
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            QFormat::Q4_0 => direct_f::<Q4_0>(bb, rows, x, k),
            QFormat::Q4_1 => direct_f::<Q4_1>(bb, rows, x, k),
            QFormat::Q8_0 => direct_f::<Q8_0>(bb, rows, x, k),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dequantize_rows_f<const F: u8>(bb: usize, rows: [&[u8]; NR], k: usize, scratch: &mut [f32]) {
    let ahead = PREFETCH_GROUPS * NR * (k / BLOCK) * bb;
    for b in 0..k / BLOCK {
        let at = b * bb;
        // SAFETY: every row holds k / 32 blocks of bb bytes; scratch holds NR k floats.
        unsafe {
            for row in &rows {
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(at + ahead).cast());
            }
            let mut dm = [0f32; 8];
            _mm256_storeu_ps(dm.as_mut_ptr(), pairs4(&rows, at));
            for i in 0..NR {
                let q = levels::<F>(rows[i].as_ptr().add(at + levels_at(F)));
                let d = dm[2 * i];
                let m = match F {
                    Q4_0 => -8.0 * d,
                    Q4_1 => dm[2 * i + 1],
                    _ => 0.0,
                };
                let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let out = scratch.as_mut_ptr().add(i * k + b * BLOCK);
                for (j, v) in q.iter().enumerate() {
                    _mm256_storeu_ps(out.add(8 * j), _mm256_fmadd_ps(*v, d, m));
                }
            }
        }
    }
}

/// Dequantizes 4 rows of `W` into `scratch` (`[4, k]`).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every row holds `k / 32` blocks; `scratch` holds `4 k`.
pub(super) unsafe fn dequantize_rows(
    format: QFormat,
    rows: [&[u8]; NR],
    k: usize,
    scratch: &mut [f32],
) {
    let bb = format.block_bytes();
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            QFormat::Q4_0 => dequantize_rows_f::<Q4_0>(bb, rows, k, scratch),
            QFormat::Q4_1 => dequantize_rows_f::<Q4_1>(bb, rows, k, scratch),
            QFormat::Q8_0 => dequantize_rows_f::<Q8_0>(bb, rows, k, scratch),
        }
    }
}
