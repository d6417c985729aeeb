//! The AVX2 + FMA (+ F16C) kernels of [`super::qmatmul_nt`], over groups of 4 `W` rows
//! (independent accumulation chains): a block's 32 weights are dequantized to four 8-lane f32
//! vectors (`d q + m`, exactly the dequantized values) and multiplied with `x` (up to
//! `DIRECT_MAX_ROWS` rows of `x`: a decode step is bound by decoding the blocks), or stored into
//! the scratch buffer the dense kernel reads (more rows).
//!
//! The format is a const parameter so that each kernel is compiled for one block layout, and no
//! closures are used inside the `target_feature` functions (they would not inherit the features).

use std::arch::x86_64::*;

use super::{BLOCK, NR, QFormat};

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

/// The block's 32 weights as four vectors (weights 0-7, 8-15, 16-23, 24-31).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dequantize<const F: u8>(block: &[u8]) -> [__m256; 4] {
    // SAFETY: every block holds at least 18 bytes (the scales and the levels read below).
    unsafe {
        let halves = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (block.as_ptr().cast::<i32>()).read_unaligned(),
        ));
        let d = _mm256_set1_ps(_mm_cvtss_f32(halves));
        let off = match F {
            Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
            Q4_1 => _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(halves, halves, 1))),
            _ => _mm256_setzero_ps(),
        };
        let q: [__m256i; 4] = if F == Q8_0 {
            let a = _mm_loadu_si128(block.as_ptr().add(2).cast());
            let b = _mm_loadu_si128(block.as_ptr().add(18).cast());
            [
                _mm256_cvtepi8_epi32(a),
                _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)),
                _mm256_cvtepi8_epi32(b),
                _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)),
            ]
        } else {
            let start = if F == Q4_1 { 4 } else { 2 };
            let raw = _mm_loadu_si128(block.as_ptr().add(start).cast());
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            [
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
            ]
        };
        [
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[0]), d, off),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[1]), d, off),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), d, off),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), d, off),
        ]
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn direct_f<const F: u8>(bb: usize, rows: [&[u8]; NR], x: &[f32], k: usize) -> [f32; NR] {
    let mut acc = [_mm256_setzero_ps(); NR];
    for b in 0..k / BLOCK {
        let xb = &x[b * BLOCK..][..BLOCK];
        // SAFETY: xb holds 32 floats.
        let (x0, x1, x2, x3) = unsafe {
            (
                _mm256_loadu_ps(xb.as_ptr()),
                _mm256_loadu_ps(xb.as_ptr().add(8)),
                _mm256_loadu_ps(xb.as_ptr().add(16)),
                _mm256_loadu_ps(xb.as_ptr().add(24)),
            )
        };
        for i in 0..NR {
            let w = dequantize::<F>(&rows[i][b * bb..(b + 1) * bb]);
            let s = _mm256_fmadd_ps(w[0], x0, _mm256_mul_ps(w[1], x1));
            let t = _mm256_fmadd_ps(w[2], x2, _mm256_mul_ps(w[3], x3));
            acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(s, t));
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// `out[w] = x · W[w]` for 4 rows of `W`, decoding every block.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every row holds `k / 32` blocks; `x` holds `k` values.
pub(super) unsafe fn direct(format: QFormat, rows: [&[u8]; NR], x: &[f32], k: usize) -> [f32; NR] {
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
    for (w, row) in rows.iter().enumerate() {
        for b in 0..k / BLOCK {
            let v = dequantize::<F>(&row[b * bb..(b + 1) * bb]);
            let out = &mut scratch[w * k + b * BLOCK..][..BLOCK];
            // SAFETY: out holds 32 floats.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
                _mm256_storeu_ps(out.as_mut_ptr().add(16), v[2]);
                _mm256_storeu_ps(out.as_mut_ptr().add(24), v[3]);
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
