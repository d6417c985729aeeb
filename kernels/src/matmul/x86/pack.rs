//! Packing of row-major sources into the `[kc][len]` panels of [`super::super::packed`] with
//! vector instructions: AVX-512 gathers, and AVX2 8 × 8 transposes.

use std::arch::x86_64::{
    __m256, __mmask16, _mm_castps_pd, _mm_store_sd, _mm_storeu_ps, _mm256_castps256_ps128,
    _mm256_extractf128_ps, _mm256_loadu_ps, _mm256_permute2f128_ps, _mm256_setzero_ps,
    _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    _mm512_mask_i32gather_ps, _mm512_mask_storeu_ps, _mm512_mullo_epi32, _mm512_set1_epi32,
    _mm512_setr_epi32, _mm512_setzero_ps,
};

use super::super::packed::{PackAt, pack};

/// [`pack`] by gathers: each step reads one column of 16 rows (masked to the
/// rows that exist) and stores it as 16 consecutive panel values (masked to the panel's width),
/// instead of one scalar copy per value (the scalar packing took about a fifth of a 512-row
/// SmolLM2 prefill's projection time; with gathers, about an eighth).
#[target_feature(enable = "avx512f")]
pub(super) fn pack_avx512(src: &[f32], at: PackAt, panel: &mut [f32]) {
    let PackAt { k, k0, kc, r0, .. } = at;
    let (len, valid) = at.panel_rows(panel.len());
    assert!(
        len * kc == panel.len()
            && (valid == 0 || (r0 + valid - 1) * k + k0 + kc <= src.len())
            && i32::try_from(16 * k).is_ok(),
        "pack outside its source"
    );
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(k as i32));
    for g in (0..len).step_by(16) {
        let width = (len - g).min(16);
        let rows_here = valid.saturating_sub(g).min(16);
        let read: __mmask16 = ((1u32 << rows_here) - 1) as __mmask16;
        let write: __mmask16 = ((1u32 << width) - 1) as __mmask16;
        // Row `r0 + g`, column `k0`; lanes past `rows_here` are masked off and never read.
        let base = src.as_ptr().wrapping_add((r0 + g) * k + k0);
        for kk in 0..kc {
            // SAFETY: the lanes of `read` are rows `r0 + g + i < r0 + valid`, whose columns
            // `k0 + kk < k0 + kc` lie in `src` (asserted); masked-off lanes are not accessed.
            // The store writes `width` values at `kk * len + g + width <= panel.len()`.
            unsafe {
                let v = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    read,
                    offsets,
                    base.wrapping_add(kk),
                );
                _mm512_mask_storeu_ps(panel.as_mut_ptr().add(kk * len + g), write, v);
            }
        }
    }
}

/// [`pack`] by 8 × 8 transposes: each step loads 8 columns of 8 rows (one vector per row; zeros
/// for rows past the source) and stores them as 8 panel columns, instead of one scalar copy per
/// value (the scalar packing took about an eighth of a 512-row product on TinyLlama's shapes
/// with the AVX2 micro-kernel). Columns past the last multiple of 8 go through [`pack`] (they
/// are the panel's last rows, `[kc % 8][len]`).
#[target_feature(enable = "avx2")]
pub(super) fn pack_avx2(src: &[f32], at: PackAt, panel: &mut [f32]) {
    let PackAt { k, k0, kc, r0, .. } = at;
    let (len, valid) = at.panel_rows(panel.len());
    assert!(
        len * kc == panel.len() && (valid == 0 || (r0 + valid - 1) * k + k0 + kc <= src.len()),
        "pack outside its source"
    );
    let body = kc - kc % 8;
    for g in (0..len).step_by(8) {
        let width = (len - g).min(8);
        let rows_here = valid.saturating_sub(g).min(8);
        let first = (r0 + g) * k + k0;
        for kk in (0..body).step_by(8) {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, row) in rows.iter_mut().enumerate().take(rows_here) {
                // SAFETY: row `r0 + g + i < r0 + valid` holds columns `k0 + kk .. k0 + kk + 8`
                // (kk + 8 <= body <= kc; asserted above).
                *row = unsafe { _mm256_loadu_ps(src.as_ptr().add(first + i * k + kk)) };
            }
            // SAFETY: AVX2 is enabled in this function.
            let columns = unsafe { transpose8(rows) };
            for (j, column) in columns.into_iter().enumerate() {
                // SAFETY: `width` values at (kk + j) · len + g, with g + width <= len and
                // kk + j < kc, lie in `panel` (len · kc long, asserted).
                unsafe { store_first(panel.as_mut_ptr().add((kk + j) * len + g), column, width) };
            }
        }
    }
    if body < kc {
        let tail = PackAt {
            k0: k0 + body,
            kc: kc - body,
            ..at
        };
        pack(src, tail, &mut panel[body * len..]);
    }
}

/// The columns of the 8 × 8 block whose rows are `r`: `out[j][i] = r[i][j]`.
///
/// # Safety
/// The CPU must support AVX.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: the caller guarantees AVX.
    unsafe {
        // Pairs of rows interleaved, then quadruples, within each 128-bit half ...
        let t: [__m256; 8] = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let q: [__m256; 8] = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        // ... then the halves of rows 0-3 and 4-7 joined: columns 0-3 from the low halves,
        // 4-7 from the high ones.
        [
            _mm256_permute2f128_ps::<0x20>(q[0], q[4]),
            _mm256_permute2f128_ps::<0x20>(q[1], q[5]),
            _mm256_permute2f128_ps::<0x20>(q[2], q[6]),
            _mm256_permute2f128_ps::<0x20>(q[3], q[7]),
            _mm256_permute2f128_ps::<0x31>(q[0], q[4]),
            _mm256_permute2f128_ps::<0x31>(q[1], q[5]),
            _mm256_permute2f128_ps::<0x31>(q[2], q[6]),
            _mm256_permute2f128_ps::<0x31>(q[3], q[7]),
        ]
    }
}

/// Writes the first `width` (at most 8) lanes of `v` to `p`: one store for 8 (`NR` panels),
/// two for 6 (AVX2's `MR`), through a scratch copy otherwise.
///
/// # Safety
/// The CPU must support AVX, and `p` must be valid for writing `width` values.
#[inline(always)]
unsafe fn store_first(p: *mut f32, v: __m256, width: usize) {
    // SAFETY: the caller guarantees AVX and `width` writable values at `p`.
    unsafe {
        match width {
            8 => _mm256_storeu_ps(p, v),
            6 => {
                _mm_storeu_ps(p, _mm256_castps256_ps128(v));
                let high = _mm256_extractf128_ps::<1>(v);
                _mm_store_sd(p.add(4).cast(), _mm_castps_pd(high));
            }
            _ => {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), p, width.min(8));
            }
        }
    }
}
