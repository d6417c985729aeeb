//! The AVX2 + FMA (+ F16C) kernels of [`super::qmatmul_nt`], over the groups of 4 `W` rows of
//! [`super::Packed`].
//!
//! The direct kernel (a few rows of `x`: a decode step is bound by decoding the blocks) meets
//! the weight levels, unpacked to 16-bit lanes by in-lane shifts and masks, with `x`'s 16-bit
//! levels laid out in the same lanes ([`super::Activations`], [`super::lanes`]) in `vpmaddwd`
//! (exact integer sums). For the 4-bit formats one 256-bit load takes two rows' level bytes and
//! four mask/shift steps give all 64 of their levels; the two rows' sums then share one
//! conversion and one multiply-add. (The widening `vpmov[sz]xbw` this replaces are cross-lane
//! shuffles that were the bottleneck of the shuffle pipes.) The 4 rows' scales are converted by
//! one `vcvtph2ps` and multiplied by `x`'s block scale and sum, which gives each row's block scale
//! and its offset term at once (`Σ (d q + m) x = d Σ q x + m Σ x`). The group after next is
//! prefetched. The dense path stores the exactly dequantized weights (`d q + m`) into the
//! scratch buffer the dense kernel reads.
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

/// How many groups ahead the kernels prefetch. A decode step reads the weights once from DRAM
/// with little else to overlap; the hardware prefetcher alone left two cores well below the
/// bandwidth they reach with this.
const PREFETCH_GROUPS: usize = 2;

const fn format_of(f: u8) -> QFormat {
    match f {
        Q4_0 => QFormat::Q4_0,
        Q4_1 => QFormat::Q4_1,
        _ => QFormat::Q8_0,
    }
}

/// The 4 rows' scales of the group block at `block`, in f32: `[d0 d1 d2 d3 d0 d1 d2 d3]`
/// (Q4_0, Q8_0) or `[d0 m0 d1 m1 d2 m2 d3 m3]` (Q4_1).
///
/// # Safety
/// `block` points at a group block.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scales<const F: u8>(block: *const u8) -> __m256 {
    // SAFETY: the caller's contract (8 or 16 bytes of scales).
    unsafe {
        if F == Q4_1 {
            _mm256_cvtph_ps(_mm_loadu_si128(block.cast()))
        } else {
            _mm256_cvtph_ps(_mm_set1_epi64x(block.cast::<i64>().read_unaligned()))
        }
    }
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

/// Prefetches the group block `ahead` bytes past `block` (`bytes` long).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn prefetch(block: *const u8, ahead: usize, bytes: usize) {
    let mut at = 0;
    while at < bytes {
        // Prefetching never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(ahead + at).cast());
        at += 64;
    }
}

/// `x · W[i]` for the 4 rows of a 4-bit group: two rows per 256-bit load.
#[target_feature(enable = "avx2,fma,f16c")]
fn direct_q4<const F: u8>(group: &[u8], x: &Activations, k: usize) -> [f32; NR] {
    let gbb = NR * format_of(F).block_bytes();
    let sb = NR * format_of(F).scale_bytes();
    let ahead = PREFETCH_GROUPS * group.len();
    let mut acc = [_mm256_setzero_ps(); 2];
    // Each row's offset term `Σ m Σx`, in the lanes the scales put it (Q4_0 4-7, Q4_1 odd).
    let mut acc_m = _mm256_setzero_ps();
    let low = _mm256_set1_epi16(0x0f);
    // The lanes of the rows' `d dx` in the scaled vector, for the pairs (0, 1) and (2, 3).
    let picks = if F == Q4_0 {
        [
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
            _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
        ]
    } else {
        [
            _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
            _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6),
        ]
    };
    for b in 0..k / BLOCK {
        // SAFETY: the group holds k / 32 blocks of gbb bytes; x holds 64 levels and one
        // scale vector per block.
        unsafe {
            let block = group.as_ptr().add(b * gbb);
            prefetch(block, ahead, gbb);
            let v = _mm256_mul_ps(scales::<F>(block), _mm256_load_ps(x.scales[b].0.as_ptr()));
            acc_m = _mm256_add_ps(acc_m, v);
            let xl = x.levels.as_ptr().add(b * 64);
            let xs = [
                _mm256_loadu_si256(xl.cast()),
                _mm256_loadu_si256(xl.add(16).cast()),
                _mm256_loadu_si256(xl.add(32).cast()),
                _mm256_loadu_si256(xl.add(48).cast()),
            ];
            for (pair, acc) in acc.iter_mut().enumerate() {
                let raw = _mm256_loadu_si256(block.add(sb + 32 * pair).cast());
                let w = [
                    _mm256_and_si256(raw, low),
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                    _mm256_and_si256(_mm256_srli_epi16(raw, 8), low),
                    _mm256_srli_epi16(raw, 12),
                ];
                // Exact: |Σ q x| ≤ 32 · 15 · 32767 < 2^24, exact in f32 too.
                let p = _mm256_add_epi32(
                    _mm256_add_epi32(
                        _mm256_madd_epi16(w[0], xs[0]),
                        _mm256_madd_epi16(w[1], xs[1]),
                    ),
                    _mm256_add_epi32(
                        _mm256_madd_epi16(w[2], xs[2]),
                        _mm256_madd_epi16(w[3], xs[3]),
                    ),
                );
                let ds = _mm256_permutevar8x32_ps(v, picks[pair]);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, *acc);
            }
        }
    }
    let mut t = [[0f32; 8]; 3];
    // SAFETY: each holds 8 floats.
    unsafe {
        _mm256_storeu_ps(t[0].as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(t[1].as_mut_ptr(), acc[1]);
        _mm256_storeu_ps(t[2].as_mut_ptr(), acc_m);
    }
    let mut out = [0f32; NR];
    for (i, o) in out.iter_mut().enumerate() {
        let offset = if F == Q4_0 {
            t[2][4 + i]
        } else {
            t[2][2 * i + 1]
        };
        *o = t[i / 2][4 * (i % 2)..][..4].iter().sum::<f32>() + offset;
    }
    out
}

/// `x · W[i]` for the 4 rows of a Q8_0 group.
#[target_feature(enable = "avx2,fma,f16c")]
fn direct_q8(group: &[u8], x: &Activations, k: usize) -> [f32; NR] {
    let gbb = NR * QFormat::Q8_0.block_bytes();
    let sb = NR * QFormat::Q8_0.scale_bytes();
    let ahead = PREFETCH_GROUPS * group.len();
    let mut acc = [_mm256_setzero_ps(); NR];
    let picks = [
        _mm256_set1_epi32(0),
        _mm256_set1_epi32(1),
        _mm256_set1_epi32(2),
        _mm256_set1_epi32(3),
    ];
    for b in 0..k / BLOCK {
        // SAFETY: the group holds k / 32 blocks of gbb bytes; x holds 32 levels and one
        // scale vector per block.
        unsafe {
            let block = group.as_ptr().add(b * gbb);
            prefetch(block, ahead, gbb);
            let v = _mm256_mul_ps(
                scales::<Q8_0>(block),
                _mm256_load_ps(x.scales[b].0.as_ptr()),
            );
            let xl = x.levels.as_ptr().add(b * 32);
            let (x_even, x_odd) = (
                _mm256_loadu_si256(xl.cast()),
                _mm256_loadu_si256(xl.add(16).cast()),
            );
            for (i, acc) in acc.iter_mut().enumerate() {
                let raw = _mm256_loadu_si256(block.add(sb + 32 * i).cast());
                let even = _mm256_srai_epi16(_mm256_slli_epi16(raw, 8), 8);
                let odd = _mm256_srai_epi16(raw, 8);
                // Exact in i32: |Σ q x| ≤ 32 · 128 · 32767.
                let p = _mm256_add_epi32(
                    _mm256_madd_epi16(even, x_even),
                    _mm256_madd_epi16(odd, x_odd),
                );
                let ds = _mm256_permutevar8x32_ps(v, picks[i]);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, *acc);
            }
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// `out[i] = x · W[i]` for the 4 rows of a group, decoding every block against `x`'s 16-bit
/// levels.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `group` holds `k / 32` group blocks of `format`; `x`
/// was prepared for `format` from `k` values.
pub(super) unsafe fn direct(format: QFormat, group: &[u8], x: &Activations, k: usize) -> [f32; NR] {
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            QFormat::Q4_0 => direct_q4::<Q4_0>(group, x, k),
            QFormat::Q4_1 => direct_q4::<Q4_1>(group, x, k),
            QFormat::Q8_0 => direct_q8(group, x, k),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dequantize_group_f<const F: u8>(group: &[u8], k: usize, scratch: &mut [f32]) {
    let format = format_of(F);
    let gbb = NR * format.block_bytes();
    let (sb, lb) = (NR * format.scale_bytes(), format.level_bytes());
    let ahead = PREFETCH_GROUPS * group.len();
    for b in 0..k / BLOCK {
        // SAFETY: the group holds k / 32 blocks of gbb bytes; scratch holds NR k floats.
        unsafe {
            let block = group.as_ptr().add(b * gbb);
            prefetch(block, ahead, gbb);
            let mut sc = [0f32; 8];
            _mm256_storeu_ps(sc.as_mut_ptr(), scales::<F>(block));
            for i in 0..NR {
                let q = levels::<F>(block.add(sb + i * lb));
                let (d, m) = match F {
                    Q4_0 => (sc[i], -8.0 * sc[i]),
                    Q4_1 => (sc[2 * i], sc[2 * i + 1]),
                    _ => (sc[i], 0.0),
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

/// Dequantizes the 4 rows of a group into `scratch` (`[4, k]`).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `group` holds `k / 32` group blocks of `format`;
/// `scratch` holds `4 k`.
pub(super) unsafe fn dequantize_group(
    format: QFormat,
    group: &[u8],
    k: usize,
    scratch: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            QFormat::Q4_0 => dequantize_group_f::<Q4_0>(group, k, scratch),
            QFormat::Q4_1 => dequantize_group_f::<Q4_1>(group, k, scratch),
            QFormat::Q8_0 => dequantize_group_f::<Q8_0>(group, k, scratch),
        }
    }
}
