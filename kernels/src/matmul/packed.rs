//! `y = x Wᵀ` for many rows (prefill chunks): a packed, outer-product gemm.
//!
//! The streaming kernel of [`super`] reads `W` once per call but sums each output as `LANES`
//! strided partial sums reduced at the end of `K`; with many `x` rows and a short `K` (576 for
//! SmolLM2-135M) those reductions and the re-reads of `x` cost more than the products.
//! Here, per block of `K`:
//! * `x` is copied into micro-panels of `MR` rows (`[kc][MR]`) and `W` into panels of `NR` rows
//!   (`[kc][NR]`, i.e. `Wᵀ`), zero-padded at the ends;
//! * the output is split into tasks (a block of `MC` rows × a range of `W` panels) that run on
//!   the rayon pool; within a task each `x` micro-panel stays in L1 while the task's `W` panels
//!   (in L2) pass over it;
//! * the micro-kernel ([`Panels::panel`]) keeps an `MR × NR` tile in registers and broadcasts
//!   `MR` values of `x` against `NR` of `W` per step.
//!
//! Every output is one chain of fused multiply-adds in `k` order (a later `K` block continues
//! from the stored partial sum), so a row's result does not depend on how many rows the call
//! has, on the blocking or on the threads.

use rayon::prelude::*;

use super::{Update, split_columns};
use crate::Shape;

/// Longest `K` block (the `W` panel of a block is `kc × NR × 4` bytes: 48 KiB with `NR = 32`,
/// in L2). Measured at 512 rows on the SmolLM2 and TinyLlama shapes: 192 gave 74-134 GFLOP/s on
/// TinyLlama's, 384 and 512 120-187 (within the VM's noise of each other).
const KC_MAX: usize = 384;

/// `x` micro-panels per task row block (`MC = MR × MC_PANELS` rows).
const MC_PANELS: usize = 8;

/// Tasks per rayon thread (load balance on a shared machine).
const TASKS_PER_THREAD: usize = 4;

/// An outer-product micro-kernel over packed panels.
pub(super) trait Panels: Copy + Send + Sync {
    /// `x` rows per tile.
    const MR: usize;
    /// `W` rows (output columns) per tile.
    const NR: usize;

    /// `out.rows[r][out.c0 + j] = out.update(Σ_kk a(r, kk) · b[kk][j])` for `MR` rows of `a`
    /// ([`APanel`]), `b: [kc][NR]` (row-major) and exactly `MR` output rows of at least
    /// `c0 + NR` values.
    fn panel(self, kc: usize, a: APanel<'_>, b: &[f32], out: PanelOut<'_, '_>);

    /// [`pack`] (an instruction set may do it faster).
    fn pack(self, src: &[f32], at: PackAt, panel: &mut [f32]) {
        pack(src, at, panel)
    }
}

/// The `MR` rows of the left operand that one micro-kernel call multiplies, over `kc` steps.
#[derive(Debug, Clone, Copy)]
pub(super) enum APanel<'a> {
    /// A packed micro-panel `[kc][MR]`: row `r` of step `kk` at `kk · MR + r`.
    Packed(&'a [f32]),
    /// `MR` rows of a row-major matrix, read in place: row `r` of step `kk` at
    /// `r · stride + kk` (at least `(MR - 1) · stride + kc` values). The micro-kernel broadcasts
    /// `a` one value at a time, so it reads `MR` short sequential streams instead of one, and
    /// the copy into a micro-panel is spared.
    Rows {
        /// The first row's values, then the others `stride` apart.
        data: &'a [f32],
        /// Values from one row's start to the next's.
        stride: usize,
    },
}

/// Where a micro-kernel's `MR × NR` tile goes: columns `c0 .. c0 + NR` of `rows` (exactly `MR`).
pub(super) struct PanelOut<'o, 'y> {
    pub(super) rows: &'o mut [&'y mut [f32]],
    pub(super) c0: usize,
    pub(super) update: Update,
}

/// Which part of a row-major `[rows, k]` source (`k`: its row stride) one panel holds: columns
/// `k0..k0 + kc` of the rows `r0..` (as many as the panel has room for).
#[derive(Debug, Clone, Copy)]
pub(super) struct PackAt {
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) k0: usize,
    pub(super) kc: usize,
    pub(super) r0: usize,
}

impl PackAt {
    /// `(len, valid)` for a panel of `panel_len` values: its rows (`panel_len / kc`) and how
    /// many of them exist in the source (the rest are zeros).
    pub(super) fn panel_rows(&self, panel_len: usize) -> (usize, usize) {
        let len = panel_len / self.kc;
        (len, self.rows.saturating_sub(self.r0).min(len))
    }
}

/// One task: rows `m0..m0 + ys.len()` of `y`, columns of the `W` panels `q0..q1`.
struct Task<'y> {
    m0: usize,
    q0: usize,
    q1: usize,
    /// The task's part of each of its rows (columns `q0 · NR..`).
    ys: Vec<&'y mut [f32]>,
}

/// `y = x Wᵀ` (overwritten) for a checked `shape` with `rows`, `in_features` and
/// `out_features` all non-zero.
pub(super) fn run_packed<T: Panels>(
    t: T,
    shape: Shape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
) {
    let call = Call {
        shape,
        x,
        w,
        parallel,
    };
    with_pack_buffers(|a, b| run_blocks(t, &call, (a, b), y));
}

/// `f(a, b)` with this thread's pack buffers (of any length; grow them as needed). They are taken
/// out for the call (a nested call on this thread, from a rayon job run while this one waits,
/// finds none and allocates its own) and put back after.
pub(super) fn with_pack_buffers<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let (mut a, mut b) = PACK_BUFFERS.take();
    let r = f(&mut a, &mut b);
    PACK_BUFFERS.set((a, b));
    r
}

thread_local! {
    /// The packed `x` and `W` blocks of the calls made on this thread, kept between calls: a
    /// prefill chunk's projections need megabytes, which fresh allocations would map, fault in
    /// and zero on every call (about 8% of a SmolLM2 prefill step when measured).
    static PACK_BUFFERS: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// Makes `v` at least `len` long.
pub(super) fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// The operands of one product.
struct Call<'a> {
    shape: Shape,
    x: &'a [f32],
    w: &'a [f32],
    parallel: bool,
}

/// The `K` blocks of [`run_packed`], packing into `(a, b)` (grown as needed).
fn run_blocks<T: Panels>(
    t: T,
    call: &Call<'_>,
    (a, b): (&mut Vec<f32>, &mut Vec<f32>),
    y: &mut [f32],
) {
    let Call {
        shape,
        x,
        w,
        parallel,
    } = *call;
    let Shape {
        rows: m,
        in_features: k,
        out_features: n,
    } = shape;
    let (mr, nr) = (T::MR, T::NR);
    let kc_len = k.div_ceil(k.div_ceil(KC_MAX));
    let (m_panels, n_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    // Every value read is written by `pack` first: grown, never cleared.
    grow(a, m_panels * mr * kc_len);
    grow(b, n_panels * nr * kc_len);
    let mut tasks = tasks(y, shape, mr, nr, parallel);
    for k0 in (0..k).step_by(kc_len) {
        let kc = kc_len.min(k - k0);
        let at = |rows, r0| PackAt {
            rows,
            k,
            k0,
            kc,
            r0,
        };
        let pack_a = |(p, panel): (usize, &mut [f32])| t.pack(x, at(m, p * mr), panel);
        let pack_b = |(q, panel): (usize, &mut [f32])| t.pack(w, at(n, q * nr), panel);
        let (a_k, b_k) = (&mut a[..m_panels * mr * kc], &mut b[..n_panels * nr * kc]);
        if parallel {
            a_k.par_chunks_mut(mr * kc).enumerate().for_each(pack_a);
            b_k.par_chunks_mut(nr * kc).enumerate().for_each(pack_b);
        } else {
            a_k.chunks_mut(mr * kc).enumerate().for_each(pack_a);
            b_k.chunks_mut(nr * kc).enumerate().for_each(pack_b);
        }
        let compute = |task: &mut Task<'_>| run_task(t, kc, k0 == 0, a_k, b_k, task);
        if parallel {
            tasks.par_iter_mut().for_each(compute);
        } else {
            tasks.iter_mut().for_each(compute);
        }
    }
}

/// Copies columns `k0..k0 + kc` of the `len` rows `r0..r0 + len` of the row-major `src`
/// (`[rows, k]`) into `panel` as `[kc][len]`, with zeros for rows past `rows`. The writes are
/// sequential and the reads walk the `len` rows side by side (each cache line read serves the
/// next 15 columns); measured faster than reading row by row with strided writes, and than
/// blocks of 16 columns.
pub(super) fn pack(src: &[f32], at: PackAt, panel: &mut [f32]) {
    let PackAt { k, k0, kc, r0, .. } = at;
    let (len, valid) = at.panel_rows(panel.len());
    let lines: Vec<&[f32]> = (r0..r0 + valid)
        .map(|r| &src[r * k + k0..r * k + k0 + kc])
        .collect();
    for (kk, out) in panel.chunks_exact_mut(len).enumerate() {
        for (o, line) in out.iter_mut().zip(&lines) {
            *o = line[kk];
        }
        out[valid..].fill(0.0);
    }
}

/// Splits `y` (`[m, n]`) into row blocks × `W` panel ranges, enough for every thread and of
/// (nearly) equal sizes: blocks of about `MC_PANELS` micro-panels, as many as a multiple of the
/// threads (a 512-row chunk in blocks of exactly 8 panels made 11 tasks, which two threads ran
/// as 6 + 5), and the panels shared out evenly among the blocks and the ranges.
fn tasks(y: &mut [f32], shape: Shape, mr: usize, nr: usize, parallel: bool) -> Vec<Task<'_>> {
    let (m, n) = (shape.rows, shape.out_features);
    let (m_panels, n_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let row_blocks = m_panels
        .div_ceil(MC_PANELS)
        .next_multiple_of(threads)
        .min(m_panels);
    let ranges = (threads * TASKS_PER_THREAD)
        .div_ceil(row_blocks)
        .clamp(1, n_panels);
    // Block `i` holds the panels `cut(i) .. cut(i + 1)` of `count` (sizes differ by one at most).
    let cut = |i: usize, parts: usize, count: usize| i * count / parts;
    let panel_ranges: Vec<(usize, usize)> = (0..ranges)
        .map(|j| (cut(j, ranges, n_panels), cut(j + 1, ranges, n_panels)))
        .collect();
    let columns: Vec<(usize, usize)> = panel_ranges
        .iter()
        .map(|&(q0, q1)| (q0 * nr, (q1 * nr).min(n)))
        .collect();
    let mut out = Vec::with_capacity(row_blocks * ranges);
    let mut rest = &mut y[..m * n];
    for i in 0..row_blocks {
        let m0 = cut(i, row_blocks, m_panels) * mr;
        let m1 = (cut(i + 1, row_blocks, m_panels) * mr).min(m);
        let (block, tail) = std::mem::take(&mut rest).split_at_mut((m1 - m0) * n);
        rest = tail;
        let parts = split_columns(block, m1 - m0, n, &columns);
        for (&(q0, q1), ys) in panel_ranges.iter().zip(parts) {
            out.push(Task { m0, q0, q1, ys });
        }
    }
    out
}

/// The products of one `K` block for one task: stores on the first block, adds after.
fn run_task<T: Panels>(t: T, kc: usize, first: bool, a: &[f32], b: &[f32], task: &mut Task<'_>) {
    let (mr, nr) = (T::MR, T::NR);
    let update = if first {
        Update::Store
    } else {
        Update::Accumulate
    };
    let mut edge = EdgeTile::default();
    let rows = task.ys.len();
    // Each `x` micro-panel (`MR × kc`, 18 KiB) stays in L1 while the task's `W` panels stream
    // past it from L2 (measured 1-3% faster than the other order in paired runs).
    for r0 in (0..rows).step_by(mr) {
        let p = (task.m0 + r0) / mr;
        let ap = &a[p * mr * kc..(p + 1) * mr * kc];
        for q in task.q0..task.q1 {
            let bq = &b[q * nr * kc..(q + 1) * nr * kc];
            let out = PanelOut {
                rows: &mut task.ys[r0..(r0 + mr).min(rows)],
                c0: (q - task.q0) * nr,
                update,
            };
            edge.panel(t, kc, APanel::Packed(ap), bq, out);
        }
    }
}

/// A staging tile for the panels at the bottom and right edges of an output, which have fewer
/// than `MR` rows or `NR` columns: the micro-kernel works on the full tile and the part that
/// exists is copied in and out.
#[derive(Default)]
pub(super) struct EdgeTile {
    values: Vec<f32>,
}

impl EdgeTile {
    /// [`Panels::panel`] for an output of at most `MR` rows whose columns may end before
    /// `c0 + NR` (all rows equally long).
    pub(super) fn panel<T: Panels>(
        &mut self,
        t: T,
        kc: usize,
        a: APanel<'_>,
        b: &[f32],
        out: PanelOut<'_, '_>,
    ) {
        let (mr, nr) = (T::MR, T::NR);
        let PanelOut { rows, c0, update } = out;
        let cols = nr.min(rows[0].len() - c0);
        if rows.len() == mr && cols == nr {
            return t.panel(kc, a, b, PanelOut { rows, c0, update });
        }
        self.values.clear();
        self.values.resize(mr * nr, 0.0);
        if update == Update::Accumulate {
            for (tile, y) in self.values.chunks_exact_mut(nr).zip(rows.iter()) {
                tile[..cols].copy_from_slice(&y[c0..c0 + cols]);
            }
        }
        let mut tile_rows: Vec<&mut [f32]> = self.values.chunks_exact_mut(nr).collect();
        t.panel(
            kc,
            a,
            b,
            PanelOut {
                rows: &mut tile_rows,
                c0: 0,
                update,
            },
        );
        for (tile, y) in self.values.chunks_exact(nr).zip(rows.iter_mut()) {
            y[c0..c0 + cols].copy_from_slice(&tile[..cols]);
        }
    }
}
