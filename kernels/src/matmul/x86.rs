//! The x86-64 micro-kernels of [`super`]: one generic tile body over a small vector-ops trait,
//! compiled twice — for AVX-512F (16 lanes, 32 registers) and for AVX2 + FMA (8 lanes, 16
//! registers) — and reached only through the zero-sized tokens [`Avx512`] and [`Avx2Fma`], which
//! exist only after run-time feature detection.

use std::arch::x86_64::{
    __m256, __m512, _MM_HINT_T0, _MM_HINT_T1, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
    _mm_movehdup_ps, _mm_movehl_ps, _mm_prefetch, _mm256_castps256_ps128, _mm256_extractf128_ps,
    _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_set1_ps, _mm512_setzero_ps,
    _mm512_storeu_ps,
};

mod pack;

use super::Tiles;
use super::Update;
use super::packed::{APanel, PackAt, PanelOut, Panels};

/// Proof that the CPU supports AVX-512F (constructed only by [`Avx512::detect`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Avx512(());

impl Avx512 {
    /// The token, if the CPU has AVX-512F.
    pub(super) fn detect() -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(Self(()))
    }
}

/// Proof that the CPU supports AVX2 and FMA (constructed only by [`Avx2Fma::detect`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Avx2Fma(());

impl Avx2Fma {
    /// The token, if the CPU has AVX2 and FMA.
    pub(super) fn detect() -> Option<Self> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Self(()))
    }
}

/// The vector operations a tile needs. Implemented by the ISA tokens: holding `self` proves the
/// CPU supports the instructions, so only the pointer load is `unsafe`.
trait Vector: Copy {
    /// One register of f32 lanes.
    type V: Copy;
    /// Lanes per register.
    const LANES: usize;
    /// All lanes zero.
    fn zero(self) -> Self::V;
    /// `LANES` values from `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` f32 values (no alignment needed).
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Every lane `v`.
    fn splat(self, v: f32) -> Self::V;
    /// Writes the `LANES` values of `v` to `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` f32 values (no alignment needed).
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// Asks for the cache line at `p` to be brought into L2 (any address; never faults).
    #[inline(always)]
    fn prefetch(self, p: *const f32) {
        // SAFETY: prefetching is a hint that never faults, whatever the address; SSE is implied
        // by every x86-64 CPU.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
    /// Asks for the cache line at `p` to be brought into L1 (any address; never faults).
    #[inline(always)]
    fn prefetch_l1(self, p: *const f32) {
        // SAFETY: as for `prefetch`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }
    /// `a · b + c` lane-wise, rounded once.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The sum of the lanes.
    fn sum(self, v: Self::V) -> f32;
}

impl Vector for Avx512 {
    type V = __m512;
    const LANES: usize = 16;

    #[inline(always)]
    fn zero(self) -> __m512 {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values at `p`; `self` proves AVX-512F.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    fn splat(self, v: f32) -> __m512 {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { _mm512_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        // SAFETY: the caller guarantees 16 writable values at `p`; `self` proves AVX-512F.
        unsafe { _mm512_storeu_ps(p, v) }
    }

    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    fn sum(self, v: __m512) -> f32 {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { _mm512_reduce_add_ps(v) }
    }
}

impl Vector for Avx2Fma {
    type V = __m256;
    const LANES: usize = 8;

    #[inline(always)]
    fn zero(self) -> __m256 {
        // SAFETY: `self` exists only on CPUs with AVX2 and FMA.
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values at `p`; `self` proves AVX.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    fn splat(self, v: f32) -> __m256 {
        // SAFETY: `self` exists only on CPUs with AVX.
        unsafe { _mm256_set1_ps(v) }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        // SAFETY: the caller guarantees 8 writable values at `p`; `self` proves AVX.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: `self` exists only on CPUs with AVX2 and FMA.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    fn sum(self, v: __m256) -> f32 {
        // SAFETY: `self` exists only on CPUs with AVX2 (which implies SSE3 and AVX).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let odd = _mm_movehdup_ps(s);
            let pairs = _mm_add_ps(s, odd);
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehl_ps(odd, pairs)))
        }
    }
}

/// `out[r][c] = w[r][..k] · x[c][..k]`: `R × C` vector accumulators live in registers while every
/// `w` row and every `x` row is read once, one register width at a time; the last `k % LANES`
/// products are added in scalar code. (No `array::map` here: its out-of-line calls would keep the
/// accumulators in memory.) Each step also prefetches the matching 64 bytes of the `next` rows:
/// the next tile's `W` rows come in from DRAM while this one computes.
#[inline(always)]
fn tile_body<S: Vector, const R: usize, const C: usize>(
    s: S,
    w: [&[f32]; R],
    x: [&[f32]; C],
    next: [&[f32]; R],
    k: usize,
) -> [[f32; C]; R] {
    assert!(
        w.iter().chain(&x).all(|v| v.len() >= k),
        "tile rows shorter than k"
    );
    let mut acc = [[s.zero(); C]; R];
    let body = k - k % S::LANES;
    let mut i = 0;
    while i < body {
        let wp: [*const f32; R] = std::array::from_fn(|r| w[r].as_ptr().wrapping_add(i));
        let xp: [*const f32; C] = std::array::from_fn(|c| x[c].as_ptr().wrapping_add(i));
        if i % 16 == 0 {
            for row in next {
                s.prefetch(row.as_ptr().wrapping_add(i));
            }
        }
        // SAFETY: i + LANES <= body <= k, and every row holds at least k values (asserted).
        acc = unsafe { step(s, acc, wp, xp) };
        i += S::LANES;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let tail: f32 = (body..k).map(|j| w[r][j] * x[c][j]).sum();
            out[r][c] = s.sum(acc[r][c]) + tail;
        }
    }
    out
}

/// One register width of the tile: `acc[r][c] += w[r] · x[c]` lane-wise.
///
/// # Safety
/// Every pointer must be valid for reading `LANES` values.
#[inline(always)]
unsafe fn step<S: Vector, const R: usize, const C: usize>(
    s: S,
    mut acc: [[S::V; C]; R],
    w: [*const f32; R],
    x: [*const f32; C],
) -> [[S::V; C]; R] {
    // SAFETY: the caller guarantees LANES readable values behind every pointer.
    let wv: [S::V; R] = std::array::from_fn(|r| unsafe { s.load(w[r]) });
    for c in 0..C {
        // SAFETY: as above.
        let xv = unsafe { s.load(x[c]) };
        for r in 0..R {
            acc[r][c] = s.fma(wv[r], xv, acc[r][c]);
        }
    }
    acc
}

#[target_feature(enable = "avx512f")]
fn tile_avx512<const R: usize, const C: usize>(
    s: Avx512,
    w: [&[f32]; R],
    x: [&[f32]; C],
    next: [&[f32]; R],
    k: usize,
) -> [[f32; C]; R] {
    tile_body(s, w, x, next, k)
}

#[target_feature(enable = "avx2,fma")]
fn tile_avx2<const R: usize, const C: usize>(
    s: Avx2Fma,
    w: [&[f32]; R],
    x: [&[f32]; C],
    next: [&[f32]; R],
    k: usize,
) -> [[f32; C]; R] {
    tile_body(s, w, x, next, k)
}

impl Tiles for Avx512 {
    /// 4 W rows × 6 x rows = 24 accumulators + 4 W registers + 1 x register of the 32 zmm.
    const MR: usize = 6;

    #[inline]
    fn tile<const R: usize, const C: usize>(
        self,
        w: [&[f32]; R],
        x: [&[f32]; C],
        next: [&[f32]; R],
        k: usize,
    ) -> [[f32; C]; R] {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { tile_avx512(self, w, x, next, k) }
    }
}

impl Tiles for Avx2Fma {
    /// 4 W rows × 3 x rows = 12 accumulators + 4 W registers of the 16 ymm (x from memory).
    const MR: usize = 3;

    #[inline]
    fn tile<const R: usize, const C: usize>(
        self,
        w: [&[f32]; R],
        x: [&[f32]; C],
        next: [&[f32]; R],
        k: usize,
    ) -> [[f32; C]; R] {
        // SAFETY: `self` exists only on CPUs with AVX2 and FMA.
        unsafe { tile_avx2(self, w, x, next, k) }
    }
}

/// `W` panel rows (steps of `k`) that [`panel_body`] prefetches into L1 ahead of use: `W` panels
/// of up to `KC_MAX` steps (48 KiB) stream from L2, and profiles of the loop without the
/// prefetch put a quarter of its samples on the first instructions waiting for them (one run of
/// a 512-row product: 0.51 → 0.55 of the FMA peak).
const PANEL_PREFETCH: usize = 8;

/// `out[r][c0 + j] = update(Σ_kk a(r, kk) · b[kk][j])` for `r < MR`, `j < NV · LANES`, over
/// `MR` rows of `a` and one packed `W` panel `b` (`[kc][NV · LANES]`): the tile lives in
/// `MR × NV` vector accumulators while every step broadcasts `MR` values of `a` against `NV`
/// vectors of `b` (an outer product), and goes straight to the output rows (no staging buffer:
/// zeroing and copying one cost about 6% of a prefill step). `a = (values, stride)`: a packed
/// micro-panel `[kc][MR]` (`A_ROWS` false, `a(r, kk)` at `kk · MR + r`; the stride is `MR`) or
/// `MR` rows read in place (`A_ROWS` true, `a(r, kk)` at `r · stride + kk`). Each output is one
/// chain of fused multiply-adds in `k` order, started from zero or, with
/// [`Update::Accumulate`], from the value already in `out`.
#[inline(always)]
fn panel_body<S: Vector, const MR: usize, const NV: usize, const A_ROWS: bool>(
    s: S,
    kc: usize,
    (a, stride): (&[f32], usize),
    b: &[f32],
    out: PanelOut<'_, '_>,
) {
    let PanelOut {
        rows: out,
        c0,
        update,
    } = out;
    let nr = NV * S::LANES;
    let a_len = if A_ROWS {
        (MR - 1).checked_mul(stride).and_then(|v| v.checked_add(kc))
    } else {
        kc.checked_mul(MR)
    };
    assert!(
        a_len.is_some_and(|len| a.len() >= len)
            && b.len() >= kc * nr
            && out.len() == MR
            && out.iter().all(|row| row.len() >= c0 + nr),
        "panel shorter than its shape"
    );
    let mut acc = [[s.zero(); NV]; MR];
    if update == Update::Accumulate {
        for (row, y) in acc.iter_mut().zip(out.iter()) {
            for (v, reg) in row.iter_mut().enumerate() {
                // SAFETY: c0 + v * LANES + LANES <= c0 + nr <= y.len() (asserted).
                *reg = unsafe { s.load(y.as_ptr().add(c0 + v * S::LANES)) };
            }
        }
    }
    // Raw pointers in the loop: a slice's bounds checks there (two compare-and-branch pairs per
    // step) held the loop to about three quarters of the FMA ports' rate.
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for kk in 0..kc {
        // SAFETY: kk * nr + nr <= kc * nr <= b.len(); a's offsets are at most
        // (MR - 1) * stride + kk < a_len <= a.len() (rows) or kk * MR + MR - 1 < a_len (packed)
        // (asserted).
        unsafe {
            let bk = bp.add(kk * nr);
            for v in 0..NV {
                s.prefetch_l1(bk.wrapping_add(PANEL_PREFETCH * nr + v * S::LANES));
            }
            let bv: [S::V; NV] = std::array::from_fn(|v| s.load(bk.add(v * S::LANES)));
            for (r, row) in acc.iter_mut().enumerate() {
                let at = if A_ROWS { r * stride + kk } else { kk * MR + r };
                let av = s.splat(*ap.add(at));
                for (reg, b) in row.iter_mut().zip(&bv) {
                    *reg = s.fma(av, *b, *reg);
                }
            }
        }
    }
    if let Update::Scale(beta) = update {
        // `beta · Σ + 0`, rounded once: the product `beta · Σ`.
        let (beta, zero) = (s.splat(beta), s.zero());
        acc.iter_mut()
            .flatten()
            .for_each(|reg| *reg = s.fma(*reg, beta, zero));
    }
    for (row, y) in acc.iter().zip(out.iter_mut()) {
        for (v, reg) in row.iter().enumerate() {
            // SAFETY: as for the loads above.
            unsafe { s.store(y.as_mut_ptr().add(c0 + v * S::LANES), *reg) };
        }
    }
}

/// [`panel_body`] for either layout of `a` (two vectors of `b` per step).
#[inline(always)]
fn panel_any<S: Vector, const MR: usize>(
    s: S,
    kc: usize,
    a: APanel<'_>,
    b: &[f32],
    out: PanelOut<'_, '_>,
) {
    match a {
        APanel::Packed(a) => panel_body::<_, MR, 2, false>(s, kc, (a, MR), b, out),
        APanel::Rows { data, stride } => {
            panel_body::<_, MR, 2, true>(s, kc, (data, stride), b, out)
        }
    }
}

#[target_feature(enable = "avx512f")]
fn panel_avx512(s: Avx512, kc: usize, a: APanel<'_>, b: &[f32], out: PanelOut<'_, '_>) {
    panel_any::<_, { <Avx512 as Panels>::MR }>(s, kc, a, b, out)
}

#[target_feature(enable = "avx2,fma")]
fn panel_avx2(s: Avx2Fma, kc: usize, a: APanel<'_>, b: &[f32], out: PanelOut<'_, '_>) {
    panel_any::<_, { <Avx2Fma as Panels>::MR }>(s, kc, a, b, out)
}

impl Panels for Avx512 {
    /// 12 rows × 2 registers = 24 accumulators + 2 `W` registers + 1 broadcast of the 32 zmm.
    const MR: usize = 12;
    const NR: usize = 32;

    #[inline]
    fn panel(self, kc: usize, a: APanel<'_>, b: &[f32], out: PanelOut<'_, '_>) {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { panel_avx512(self, kc, a, b, out) }
    }

    #[inline]
    fn pack(self, src: &[f32], at: PackAt, panel: &mut [f32]) {
        // SAFETY: `self` exists only on CPUs with AVX-512F.
        unsafe { pack::pack_avx512(src, at, panel) }
    }
}

impl Panels for Avx2Fma {
    /// 6 rows × 2 registers = 12 accumulators + 2 `W` registers + 1 broadcast of the 16 ymm.
    const MR: usize = 6;
    const NR: usize = 16;

    #[inline]
    fn panel(self, kc: usize, a: APanel<'_>, b: &[f32], out: PanelOut<'_, '_>) {
        // SAFETY: `self` exists only on CPUs with AVX2 and FMA.
        unsafe { panel_avx2(self, kc, a, b, out) }
    }

    #[inline]
    fn pack(self, src: &[f32], at: PackAt, panel: &mut [f32]) {
        // SAFETY: `self` exists only on CPUs with AVX2 and FMA.
        unsafe { pack::pack_avx2(src, at, panel) }
    }
}
