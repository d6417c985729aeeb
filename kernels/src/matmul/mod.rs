//! `y = x Wᵀ` for the few rows of a decode step: `x: [M, K]`, `W: [N, K]` (the PyTorch `Linear`
//! layout, as stored), `y: [M, N]`, all row-major f32, tuned for M from 1 to about 64.
//!
//! A general gemm packs panels of `W` for every call; with a handful of rows that packing (a full
//! extra pass over `W`) costs more than the product. Here `W` is streamed exactly once per call,
//! in place:
//! * `N` is split into contiguous row ranges that run in parallel on the rayon pool (several per
//!   thread, so a busy core does not hold up the step);
//! * within a range, a micro-kernel takes 4 rows of `W` and up to `MR` rows of `x` (6 with
//!   AVX-512, 3 with AVX2) and keeps `4 × MR` vector accumulators in registers while it walks
//!   `K`: every `W` vector loaded feeds `MR` FMAs, every `x` vector 4. The other row chunks of
//!   `x` then reuse those 4 `W` rows from L1/L2, so DRAM sees `W` once;
//! * when `x` is larger than `X_BLOCK_BYTES`, `K` is cut into blocks so the `x` block stays in
//!   L2 while all of `W`'s rows pass over it (partial sums are added into `y`).
//!
//! The micro-kernel is chosen at run time: AVX-512F, else AVX2 + FMA, else the portable dot
//! products of `simd.rs` ([`Isa`]).

use rayon::prelude::*;

use crate::simd::dots;
use crate::{KernelError, Shape};

mod packed;
mod small;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use small::{Lhs, PackedLhs, PackedRhs, Rhs, RhsView, Strided, gemm_small};

#[cfg(test)]
mod tests;

/// `W` rows per micro-kernel tile.
const NR: usize = 4;

/// The `x` rows of one `K` block should fit in this many bytes (half of a 1 MiB L2).
const X_BLOCK_BYTES: usize = 512 << 10;

/// Smallest `K` block when `x` is too large for one.
const MIN_K_BLOCK: usize = 512;

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Row ranges of `W` per rayon thread (load balance on a shared machine).
const TASKS_PER_THREAD: usize = 4;

/// Fewest `W` rows in one parallel range.
const MIN_TASK_ROWS: usize = 16;

/// The instruction set of the micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F, 16 lanes.
    Avx512,
    /// AVX2 with FMA, 8 lanes.
    Avx2Fma,
    /// The portable dot products of the LoRA kernels (whatever the build target allows).
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Self {
        [Self::Avx512, Self::Avx2Fma]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Self::Portable)
    }

    /// From this many rows of `x` on, the packed gemm ([`Algo::Packed`]) beats streaming `W` with
    /// this instruction set's micro-kernels (`cargo bench -p medley-kernels --bench matmul`,
    /// whose "other algo" column times the algorithm not chosen). AVX2: from 64 rows the packed
    /// gemm was faster on 7 of the 9 TinyLlama and SmolLM2 shapes (up to 1.7×; at 128 rows up
    /// to 2.2×), at 48 on 5, at 32 on 2 (AVX2-only EPYC, 2 threads). AVX-512 keeps the
    /// threshold measured with its gather packing on an AVX-512 machine. Without AVX2 the
    /// product always streams.
    pub fn packed_min_rows(self) -> usize {
        match self {
            Self::Avx512 => 192,
            Self::Avx2Fma => 64,
            Self::Portable => usize::MAX,
        }
    }

    /// Whether this CPU can run the instruction set.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => x86::Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => x86::Avx2Fma::detect().is_some(),
            Self::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// `y = x Wᵀ` with the best micro-kernel for this CPU: `x: [rows, in_features]`,
/// `w: [out_features, in_features]`, `y: [rows, out_features]` (overwritten), row-major.
pub fn matmul_nt(shape: Shape, x: &[f32], w: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    matmul_nt_with(Isa::detect(), shape, x, w, y)
}

/// [`matmul_nt`] with a given instruction set (tests and benchmarks compare them); an
/// instruction set the CPU lacks is an error.
pub fn matmul_nt_with(
    isa: Isa,
    shape: Shape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_nt_isa(isa, Algo::for_rows(isa, shape.rows), shape, x, w, y, true)
}

/// [`matmul_nt_with`] with a given algorithm (the benchmark compares them at the same shapes);
/// the packed gemm needs AVX2 or AVX-512 ([`Algo::Packed`] with [`Isa::Portable`] streams).
pub fn matmul_nt_algo(
    isa: Isa,
    algo: Algo,
    shape: Shape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    matmul_nt_isa(isa, algo, shape, x, w, y, true)
}

/// [`matmul_nt`] on the calling thread only (for callers that already run in parallel).
pub(crate) fn matmul_nt_serial(
    shape: Shape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) -> Result<(), KernelError> {
    let isa = Isa::detect();
    matmul_nt_isa(isa, Algo::for_rows(isa, shape.rows), shape, x, w, y, false)
}

/// How a product meets the values already in the output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update {
    /// `y = Σ` (overwritten).
    Store,
    /// `y = beta · Σ` (overwritten, the product rounded once more).
    Scale(f32),
    /// `y = y + Σ`: each output's chain of multiply-adds starts from its value.
    Accumulate,
}

/// How the product is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// `W` streamed once per call, dot products of `W` rows with `x` rows (few rows).
    Streaming,
    /// The packed outer-product gemm of `packed` (many rows).
    Packed,
}

impl Algo {
    /// The faster algorithm for `rows` rows of `x` with `isa` ([`Isa::packed_min_rows`]).
    pub fn for_rows(isa: Isa, rows: usize) -> Self {
        if rows >= isa.packed_min_rows() {
            Self::Packed
        } else {
            Self::Streaming
        }
    }
}

fn matmul_nt_isa(
    isa: Isa,
    algo: Algo,
    shape: Shape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
) -> Result<(), KernelError> {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    crate::check_lengths(&[
        ("x", x.len(), m.saturating_mul(k)),
        ("W", w.len(), n.saturating_mul(k)),
        ("y", y.len(), m.saturating_mul(n)),
    ])?;
    let unavailable = || KernelError::IsaUnavailable {
        isa: format!("{isa:?}"),
    };
    let packed = algo == Algo::Packed && m > 0 && n > 0 && k > 0;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if packed => packed::run_packed(
            x86::Avx512::detect().ok_or_else(unavailable)?,
            shape,
            x,
            w,
            y,
            parallel,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if packed => packed::run_packed(
            x86::Avx2Fma::detect().ok_or_else(unavailable)?,
            shape,
            x,
            w,
            y,
            parallel,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => run(
            x86::Avx512::detect().ok_or_else(unavailable)?,
            shape,
            x,
            w,
            y,
            parallel,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => run(
            x86::Avx2Fma::detect().ok_or_else(unavailable)?,
            shape,
            x,
            w,
            y,
            parallel,
        ),
        Isa::Portable => run(Portable, shape, x, w, y, parallel),
        #[cfg(not(target_arch = "x86_64"))]
        _ => return Err(unavailable()),
    }
    Ok(())
}

/// A register-blocked micro-kernel.
trait Tiles: Copy + Send + Sync {
    /// Most `x` rows per tile (at most 8, the chunk lengths `tile_into` dispatches on).
    const MR: usize;

    /// `out[r][c] = w[r][..k] · x[c][..k]`; every slice holds at least `k` values. `next` are the
    /// `W` rows of the following tile (a hint: they may be prefetched).
    fn tile<const R: usize, const C: usize>(
        self,
        w: [&[f32]; R],
        x: [&[f32]; C],
        next: [&[f32]; R],
        k: usize,
    ) -> [[f32; C]; R];
}

/// The portable micro-kernel: `simd::dots` of one `W` row with up to 4 `x` rows at a time.
#[derive(Debug, Clone, Copy)]
struct Portable;

impl Tiles for Portable {
    const MR: usize = 4;

    fn tile<const R: usize, const C: usize>(
        self,
        w: [&[f32]; R],
        x: [&[f32]; C],
        _next: [&[f32]; R],
        k: usize,
    ) -> [[f32; C]; R] {
        w.map(|row| dots(&row[..k], x))
    }
}

/// Splits the row-major `[m, n]` output into per-range column slices of every row.
pub(crate) fn split_columns<'a>(
    y: &'a mut [f32],
    m: usize,
    n: usize,
    ranges: &[(usize, usize)],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut parts: Vec<Vec<&'a mut [f32]>> = ranges.iter().map(|_| Vec::with_capacity(m)).collect();
    for row in y[..m * n].chunks_mut(n) {
        let mut rest = row;
        for (part, &(a, b)) in parts.iter_mut().zip(ranges) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(b - a);
            part.push(head);
            rest = tail;
        }
    }
    parts
}

/// Splits the checked product into `W` row ranges and runs them (in parallel when large).
fn run<T: Tiles>(t: T, shape: Shape, x: &[f32], w: &[f32], y: &mut [f32], parallel: bool) {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y[..m * n].fill(0.0);
        return;
    }
    let ranges = w_ranges(shape, parallel);
    let k_block = k_block(m, k);
    let parts = split_columns(y, m, n, &ranges);
    let job = |(&(a, b), mut ys): (&(usize, usize), Vec<&mut [f32]>)| {
        run_range(t, shape, x, &w[a * k..b * k], &mut ys, k_block);
    };
    if ranges.len() == 1 {
        ranges.iter().zip(parts).for_each(job);
    } else {
        ranges.par_iter().zip(parts).for_each(job);
    }
}

/// The `W` row ranges a product of `shape` is split into: one on the calling thread when it is
/// small (or `parallel` is off), else several per rayon thread, each a multiple of `NR` rows.
pub(crate) fn w_ranges(shape: Shape, parallel: bool) -> Vec<(usize, usize)> {
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    let threads = rayon::current_num_threads();
    let macs = m.saturating_mul(n).saturating_mul(k);
    let tasks = if !parallel || threads < 2 || macs < PARALLEL_MIN_MACS {
        1
    } else {
        (threads * TASKS_PER_THREAD)
            .min(n.div_ceil(MIN_TASK_ROWS))
            .max(1)
    };
    let per_task = n.div_ceil(tasks).next_multiple_of(NR).max(1);
    (0..n)
        .step_by(per_task)
        .map(|a| (a, (a + per_task).min(n)))
        .collect()
}

/// The `K` block length for `m` rows of `x` (all of `K` when they fit `X_BLOCK_BYTES`).
fn k_block(m: usize, k: usize) -> usize {
    let fit = X_BLOCK_BYTES / (m * std::mem::size_of::<f32>()).max(1);
    if fit >= k {
        k
    } else {
        (fit - fit % 64).max(MIN_K_BLOCK)
    }
}

/// `ys[c][j] = x[c] · w[j]` for the rows `w` (`[ys[0].len(), k]`) of one range.
fn run_range<T: Tiles>(
    t: T,
    shape: Shape,
    x: &[f32],
    w: &[f32],
    ys: &mut [&mut [f32]],
    k_block: usize,
) {
    let (m, k) = (shape.rows, shape.in_features);
    let rows = w.len() / k;
    let chunks = m.div_ceil(T::MR);
    for k0 in (0..k).step_by(k_block) {
        let k1 = (k0 + k_block).min(k);
        let first = k0 == 0;
        let xs: Vec<&[f32]> = (0..m).map(|r| &x[r * k + k0..r * k + k1]).collect();
        // Rows past the end prefetch the last row again.
        let w_row = |j: usize| {
            let j = j.min(rows - 1);
            &w[j * k + k0..j * k + k1]
        };
        let mut j = 0;
        while j < rows {
            let mut m0 = 0;
            let full = rows - j >= NR;
            for c in 0..chunks {
                // Balanced chunks: 16 rows with MR = 6 run as 6 + 5 + 5.
                let len = (m - m0).div_ceil(chunks - c);
                let block = Block {
                    xs: &xs[m0..m0 + len],
                    next_row: j + if full { NR } else { 1 },
                    ys: &mut ys[m0..m0 + len],
                    col: j,
                    first,
                };
                if full {
                    tile_into(
                        t,
                        std::array::from_fn::<_, NR, _>(|r| w_row(j + r)),
                        w_row,
                        block,
                    );
                } else {
                    tile_into(t, [w_row(j)], w_row, block);
                }
                m0 += len;
            }
            j += if full { NR } else { 1 };
        }
    }
}

/// Where one tile's results go: `ys[c][col + r]` for `x` row `xs[c]` and `W` row `r`.
struct Block<'a, 'y> {
    xs: &'a [&'a [f32]],
    /// First `W` row of the next tile (for prefetching).
    next_row: usize,
    ys: &'a mut [&'y mut [f32]],
    col: usize,
    /// The first `K` block: store instead of accumulate.
    first: bool,
}

/// Runs the tile of `w` against `block.xs` (at most 8 rows) and stores the results.
fn tile_into<'w, T: Tiles, const R: usize>(
    t: T,
    w: [&'w [f32]; R],
    w_row: impl Fn(usize) -> &'w [f32],
    block: Block<'_, '_>,
) {
    fn store<const R: usize, const C: usize>(out: [[f32; C]; R], block: Block<'_, '_>) {
        for (c, y) in block.ys.iter_mut().enumerate().take(C) {
            let dst = &mut y[block.col..block.col + R];
            for (r, d) in dst.iter_mut().enumerate() {
                *d = if block.first {
                    out[r][c]
                } else {
                    *d + out[r][c]
                };
            }
        }
    }
    let k = block.xs.first().map_or(0, |x| x.len());
    let next: [&[f32]; R] = std::array::from_fn(|r| w_row(block.next_row + r));
    macro_rules! arms {
        ($($c:literal)*) => {
            match block.xs.len() {
                $($c => {
                    if let Ok(x) = <[&[f32]; $c]>::try_from(block.xs) {
                        store(t.tile::<R, $c>(w, x, next, k), block);
                    }
                })*
                _ => {
                    // Longer chunks never occur (MR <= 8); handle them row by row anyway.
                    let Block { xs, next_row, ys, col, first } = block;
                    for (c, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
                        let one = Block { xs: &xs[c..=c], next_row, ys: std::slice::from_mut(y), col, first };
                        store(t.tile::<R, 1>(w, [x], next, k), one);
                    }
                }
            }
        };
    }
    arms!(1 2 3 4 5 6 7 8);
}
