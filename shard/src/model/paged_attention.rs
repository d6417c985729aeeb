//! Causal grouped-query attention on the CPU in f32, reading keys and values in place from a
//! paged block pool.
//!
//! One layer's keys (and, separately, values) are one contiguous buffer
//! `[num_blocks * block_size, kv_heads, head_dim]` ("slot-major"); a sequence's block table maps
//! its position `p` to slot `blocks[p / block_size] * block_size + p % block_size`.
//!
//! * Spans of more than one new token (prefill chunks) run a tiled online softmax (flash-attention
//!   style): the keys and values each span sees are first gathered once per kv head into
//!   contiguous buffers; then per (sequence, kv head, query tile), over the key/value tiles that
//!   intersect the causal (and window) range, `S = Q·Kᵀ` and `acc += P·V` run as small packed
//!   matrix products (`medley_kernels::matmul::gemm_small`, AVX-512 where the CPU has it) on
//!   those buffers, and a running max / sum per query row rescales the accumulator when
//!   the max grows. Memory stays linear in the prompt: there is no `[n, n]` score matrix.
//! * Spans of one token (decode rows) run a direct pass per (sequence, kv head): dot products in
//!   8 partial sums over the keys read through the block table, a max-subtracted softmax, then
//!   the probability-weighted sum of the values.
//!
//! All (sequence, kv head, tile) tasks run in parallel on rayon; each returns its own rows,
//! which are then scattered into the output in parallel (disjoint rows, no aliasing).
//!
//! Arithmetic is transformers' eager attention: scores `(q · k) * scale`, a max-subtracted
//! softmax over the visible keys, the probability-weighted sum of the values. The scores are
//! kept in base 2, `(q · k) · scale · log2(e)` (one rounding, in the product's last step), and
//! exponentiated as `2^(s - max)` (`e^x = 2^(x · log2 e)`): a base-2 exponential needs no
//! range reduction by a rounded `ln 2`, about a third fewer operations per score. The
//! summation order and the exponential (a Cephes polynomial within ~2 ulp) differ from
//! transformers', f32 rounding far below 1e-5 for activations of order one.

use std::cell::RefCell;

use rayon::prelude::*;

use medley_kernels::matmul::{Isa, PackedRhs, Strided};

use super::kernel_math::{Fused, MulAdd, Unfused, dot, exp2_shifted_sum, max};

mod tile;

#[cfg(test)]
#[path = "paged_attention_tests.rs"]
mod tests;

/// Shape of the heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Features per head.
    pub dim: usize,
    /// Score scale (`1 / sqrt(dim)` for Llama).
    pub scale: f64,
}

/// One layer of the block pool, read in place.
pub(crate) struct PagedLayer<'a> {
    /// Keys `[num_blocks * block_size, kv_heads, dim]`.
    pub keys: &'a [f32],
    /// Values, same layout as `keys`.
    pub values: &'a [f32],
    /// Token slots per block (positive).
    pub block_size: usize,
}

/// The new query rows of one sequence.
pub(crate) struct SeqSpan<'a> {
    /// First row of this sequence in `q`.
    pub row: usize,
    /// Number of query rows (new tokens): positions `start .. start + len`.
    pub len: usize,
    /// Position of the first new token.
    pub start: usize,
    /// Block table; covers at least positions `0 .. start + len` (keys of the new tokens are
    /// already written).
    pub blocks: &'a [u32],
}

/// Most query rows per prefill tile (tokens × the query heads of one kv head); the tile takes
/// as many whole tokens as fit and, where it can, a multiple of the micro-kernel's rows
/// ([`tile_tokens`]). About 128 rows by 256 keys keeps a tile's working set (Q 128×d, packed K
/// and V tiles 256×d each, S 128×256, the accumulator 128×d: about 330 KiB at d = 64) inside a
/// core's L2 while giving the products operands large enough to run near peak; a 2,048-token
/// prompt still splits into ~50 tiles per kv head, plenty of parallel tasks. Smaller tiles
/// waste less on the masked half of the diagonal tiles but pay more per-call overhead and more
/// rescaling passes. Measured with `cargo bench -p medley-shard --bench attention` (three runs
/// of each, 2 threads): 256 keys and whole micro-panels against 128 keys and 128 rows, 2,048 /
/// 4,096 tokens, SmolLM2's shape 106 / 116 → 122 / 142 GFLOP/s on average, TinyLlama's 115 /
/// 120 → 124 / 134.
const TILE_ROWS: usize = 128;
/// Key positions per key tile (see [`TILE_ROWS`]).
const TILE_KEYS: usize = 256;

/// Tokens per prefill tile for `group` query heads per kv head: the most whose rows fit in
/// [`TILE_ROWS`], preferring a row count that fills whole micro-panels of `isa` (`panel_rows`),
/// which spares the padded edge panel of every product.
fn tile_tokens(group: usize, panel_rows: usize) -> usize {
    let most = (TILE_ROWS / group).max(1);
    (1..=most)
        .rev()
        .find(|t| (t * group).is_multiple_of(panel_rows))
        .unwrap_or(most)
}

/// Causal grouped-query attention of every sequence's new rows over its cached keys/values.
/// `q`: `[rows, heads, dim]` contiguous. Returns `[rows, heads * dim]` row-major (rows that no
/// span covers are zero).
///
/// Query at position `p` sees keys at positions `lo(p) ..= p`, `lo(p)` = 0 or, with a sliding
/// window `w`, `(p + 1).saturating_sub(w)`.
pub(crate) fn paged_attention(
    q: &[f32],
    seqs: &[SeqSpan<'_>],
    kv: &PagedLayer<'_>,
    h: Heads,
    window: Option<usize>,
) -> candle_core::Result<Vec<f32>> {
    let ctx = Ctx::new(q, kv, h, window)?;
    for (i, s) in seqs.iter().enumerate() {
        ctx.check_span(i, s)?;
    }
    let group = ctx.group;
    let tokens_per_tile = tile_tokens(group, ctx.isa.lhs_panel_rows());
    // The keys and values of every prefill span, gathered contiguous once per kv head: its
    // tiles read them in place (gathering per tile would copy every key once per query tile).
    let spans: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.len > 1)
        .flat_map(|(seq, _)| (0..h.kv_heads).map(move |kv_head| (seq, kv_head)))
        .collect();
    let gathered: Vec<Gathered> = spans
        .par_iter()
        .map(|&(seq, kv_head)| ctx.gather(&seqs[seq], kv_head))
        .collect();
    // Tasks of one (sequence, tile) are consecutive, kv head innermost: the scatter below finds
    // them from the first.
    let mut tasks = Vec::new();
    let mut next_gathered = 0;
    for (seq, s) in seqs.iter().enumerate() {
        let (step, kv) = if s.len == 1 {
            (1, None)
        } else {
            next_gathered += h.kv_heads;
            (tokens_per_tile, Some(next_gathered - h.kv_heads))
        };
        for first in (0..s.len).step_by(step) {
            let len = step.min(s.len - first);
            for kv_head in 0..h.kv_heads {
                tasks.push(Task {
                    seq,
                    kv_head,
                    first,
                    len,
                    gathered: kv.map(|k| k + kv_head),
                });
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| {
            let kv = t.gathered.map(|i| &gathered[i]);
            SCRATCH.with_borrow_mut(|scratch| run(&ctx, &seqs[t.seq], t, kv, scratch))
        })
        .collect();
    // Output row -> (index of its tile's first task, row within the tile). A later span wins
    // where spans overlap.
    let mut source = vec![None; ctx.rows];
    for (i, t) in tasks.iter().enumerate().filter(|(_, t)| t.kv_head == 0) {
        let row = seqs[t.seq].row + t.first;
        for (k, s) in source[row..row + t.len].iter_mut().enumerate() {
            *s = Some((i, k));
        }
    }
    let (width, part) = (h.heads * h.dim, group * h.dim);
    let mut out = vec![0f32; ctx.rows * width];
    out.par_chunks_mut(width)
        .zip(source.par_iter())
        .for_each(|(o, src)| {
            if let Some((first_task, k)) = *src {
                for (kv_head, o) in o.chunks_exact_mut(part).enumerate() {
                    o.copy_from_slice(&results[first_task + kv_head][k * part..(k + 1) * part]);
                }
            }
        });
    Ok(out)
}

/// Benchmark entry point, not an API: [`paged_attention`] of one sequence whose
/// `q.len() / (heads * dim)` rows are positions `start ..`, over a pool of `keys`/`values`
/// (`shape` = `[heads, kv_heads, dim]`, scale `1 / sqrt(dim)`, no window).
#[doc(hidden)]
pub fn bench_paged_attention(
    q: &[f32],
    start: usize,
    keys: &[f32],
    values: &[f32],
    block_size: usize,
    blocks: &[u32],
    shape: [usize; 3],
) -> candle_core::Result<Vec<f32>> {
    let [heads, kv_heads, dim] = shape;
    let h = Heads {
        heads,
        kv_heads,
        dim,
        scale: 1.0 / (dim as f64).sqrt(),
    };
    let span = SeqSpan {
        row: 0,
        len: q.len() / (heads * dim).max(1),
        start,
        blocks,
    };
    let kv = PagedLayer {
        keys,
        values,
        block_size,
    };
    paged_attention(q, &[span], &kv, h, None)
}

/// Runs one task (`kv`: the gathered keys and values of a prefill tile's span and kv head),
/// compiled for AVX-512F or AVX2 where the CPU has them: the softmax, the exponentials and the
/// decode dot products then run 16 or 8 lanes wide instead of SSE2's 4 (the matrix products
/// dispatch by themselves).
fn run(
    ctx: &Ctx<'_>,
    span: &SeqSpan<'_>,
    t: &Task,
    kv: Option<&Gathered>,
    s: &mut Scratch,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the one feature `run_avx512` is compiled for.
        return unsafe { run_avx512(ctx, span, t, kv, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the two features `run_avx2` is compiled for.
        return unsafe { run_avx2(ctx, span, t, kv, s) };
    }
    run_any::<Unfused>(ctx, span, t, kv, s)
}

/// [`run_any`] compiled with AVX-512F (which implies FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn run_avx512(
    ctx: &Ctx<'_>,
    span: &SeqSpan<'_>,
    t: &Task,
    kv: Option<&Gathered>,
    s: &mut Scratch,
) -> Vec<f32> {
    run_any::<Fused>(ctx, span, t, kv, s)
}

/// [`run_any`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2(
    ctx: &Ctx<'_>,
    span: &SeqSpan<'_>,
    t: &Task,
    kv: Option<&Gathered>,
    s: &mut Scratch,
) -> Vec<f32> {
    run_any::<Fused>(ctx, span, t, kv, s)
}

/// A decode row or a prefill tile (inlined into each instruction-set variant; `M`: how its
/// exponentials multiply and add).
#[inline(always)]
fn run_any<M: MulAdd>(
    ctx: &Ctx<'_>,
    span: &SeqSpan<'_>,
    t: &Task,
    kv: Option<&Gathered>,
    s: &mut Scratch,
) -> Vec<f32> {
    match kv {
        Some(kv) => ctx.tile::<M>(span, t, kv, s),
        None => ctx.decode::<M>(span, t.kv_head, s),
    }
}

/// One unit of parallel work: query rows `first .. first + len` of span `seq` for `kv_head`.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    kv_head: usize,
    first: usize,
    len: usize,
    /// Index of the span's gathered keys and values for `kv_head` (prefill tiles only).
    gathered: Option<usize>,
}

/// The keys and values of one kv head that a prefill span sees (positions `lo ..`), gathered
/// from the pool and packed once for all the span's query tiles: `Kᵀ` (`[dim, positions]`) and
/// `V` (`[positions, dim]`).
struct Gathered {
    lo: usize,
    kt: PackedRhs,
    v: PackedRhs,
}

/// Per-thread buffers of the tasks, reused from task to task.
#[derive(Default)]
struct Scratch {
    /// The gathered query tile `[rows, dim]`.
    q: Vec<f32>,
    /// Scores, then probabilities: `[rows, TILE_KEYS]` (tiles) or `[group, keys]` (decode).
    s: Vec<f32>,
    /// Running max per query row.
    m: Vec<f32>,
    /// Running sum of exponentials per query row.
    l: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The validated inputs of one call.
struct Ctx<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    block_size: usize,
    /// Slots in the pool.
    slots: usize,
    /// Rows of `q`.
    rows: usize,
    h: Heads,
    /// Query heads per kv head.
    group: usize,
    /// `scale · log2(e)`: the scores' scale in base 2.
    scale2: f32,
    window: Option<usize>,
    /// The instruction set of the tiles' products (operands are packed for it).
    isa: Isa,
}

impl<'a> Ctx<'a> {
    /// Checks the shapes of `q`, the heads, the pool and the window.
    fn new(
        q: &'a [f32],
        kv: &PagedLayer<'a>,
        h: Heads,
        window: Option<usize>,
    ) -> candle_core::Result<Self> {
        let width = h.heads.checked_mul(h.dim).unwrap_or(0);
        if width == 0 || h.kv_heads == 0 || !h.heads.is_multiple_of(h.kv_heads) {
            candle_core::bail!("paged attention: invalid heads {h:?}");
        }
        if !q.len().is_multiple_of(width) {
            candle_core::bail!(
                "paged attention: q has {} values, not a multiple of {} heads × {} dims",
                q.len(),
                h.heads,
                h.dim
            );
        }
        let slot_width = h.kv_heads * h.dim;
        if kv.block_size == 0
            || kv.keys.len() != kv.values.len()
            || !kv.keys.len().is_multiple_of(slot_width)
        {
            candle_core::bail!(
                "paged attention: pool of {} keys / {} values, block size {}, {} kv heads × {} dims",
                kv.keys.len(),
                kv.values.len(),
                kv.block_size,
                h.kv_heads,
                h.dim
            );
        }
        if window == Some(0) {
            candle_core::bail!("paged attention: a sliding window of 0 keys");
        }
        Ok(Self {
            q,
            keys: kv.keys,
            values: kv.values,
            block_size: kv.block_size,
            slots: kv.keys.len() / slot_width,
            rows: q.len() / width,
            h,
            group: h.heads / h.kv_heads,
            scale2: (h.scale * std::f64::consts::LOG2_E) as f32,
            window,
            isa: Isa::detect(),
        })
    }

    /// First key position visible from position `p`.
    #[inline(always)]
    fn lo(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// Checks that span `i` lies inside `q` and that its block table maps every position it
    /// reads to a slot inside the pool.
    fn check_span(&self, i: usize, s: &SeqSpan<'_>) -> candle_core::Result<()> {
        if s.len == 0 {
            return Ok(());
        }
        let (Some(row_end), Some(end)) = (s.row.checked_add(s.len), s.start.checked_add(s.len))
        else {
            candle_core::bail!("paged attention: span {i} overflows");
        };
        if row_end > self.rows {
            candle_core::bail!(
                "paged attention: span {i} has rows {}..{row_end} of {}",
                s.row,
                self.rows
            );
        }
        let (first, last) = (
            self.lo(s.start) / self.block_size,
            end.div_ceil(self.block_size),
        );
        if s.blocks.len() < last {
            candle_core::bail!(
                "paged attention: span {i} reaches position {end} with {} blocks of {}",
                s.blocks.len(),
                self.block_size
            );
        }
        for &b in &s.blocks[first..last] {
            let end = (b as usize)
                .checked_add(1)
                .and_then(|n| n.checked_mul(self.block_size));
            if end.is_none_or(|end| end > self.slots) {
                candle_core::bail!(
                    "paged attention: span {i} uses block {b}, outside a pool of {} slots",
                    self.slots
                );
            }
        }
        Ok(())
    }

    /// Calls `f(j, offset)` for the positions `lo .. hi` of `span` in order, `j = p - lo`, with
    /// the offset of kv head `kv_head`'s row of position `p` in the pool.
    #[inline(always)]
    fn for_each_row(
        &self,
        span: &SeqSpan<'_>,
        kv_head: usize,
        lo: usize,
        hi: usize,
        mut f: impl FnMut(usize, usize),
    ) {
        let (bs, stride, base) = (
            self.block_size,
            self.h.kv_heads * self.h.dim,
            kv_head * self.h.dim,
        );
        let mut p = lo;
        while p < hi {
            let within = p % bs;
            let run = (bs - within).min(hi - p);
            let slot = span.blocks[p / bs] as usize * bs + within;
            for j in 0..run {
                f(p - lo + j, (slot + j) * stride + base);
            }
            p += run;
        }
    }

    /// The query heads of `kv_head` in row `row` of `q`: `[group, dim]`, contiguous.
    #[inline(always)]
    fn q_group(&self, row: usize, kv_head: usize) -> &'a [f32] {
        let part = self.group * self.h.dim;
        let at = row * self.h.heads * self.h.dim + kv_head * part;
        &self.q[at..at + part]
    }

    /// The keys and values of `kv_head` that `span`'s rows see, gathered from the pool and
    /// packed for the tiles' products.
    fn gather(&self, span: &SeqSpan<'_>, kv_head: usize) -> Gathered {
        let d = self.h.dim;
        let (lo, hi) = (self.lo(span.start), span.start + span.len);
        let (mut k, mut v) = (vec![0f32; (hi - lo) * d], vec![0f32; (hi - lo) * d]);
        self.for_each_row(span, kv_head, lo, hi, |j, at| {
            k[j * d..(j + 1) * d].copy_from_slice(&self.keys[at..at + d]);
            v[j * d..(j + 1) * d].copy_from_slice(&self.values[at..at + d]);
        });
        let n = hi - lo;
        // Shapes and lengths hold by construction; the instruction set was detected.
        let kt = PackedRhs::new(self.isa, Strided::transposed(&k, d), d, n)
            .expect("paged attention: keys packed by construction");
        let v = PackedRhs::new(self.isa, Strided::row_major(&v, d), n, d)
            .expect("paged attention: values packed by construction");
        Gathered { lo, kt, v }
    }

    /// A decode row: the single query of `span` for the query heads of `kv_head`, reading the
    /// keys and values in place. Returns `[group, dim]`.
    #[inline(always)]
    fn decode<M: MulAdd>(&self, span: &SeqSpan<'_>, kv_head: usize, s: &mut Scratch) -> Vec<f32> {
        let (g, d) = (self.group, self.h.dim);
        let p = span.start;
        let lo = self.lo(p);
        let n = p + 1 - lo;
        let qs = self.q_group(span.row, kv_head);
        s.s.clear();
        s.s.resize(g * n, 0.0);
        let probs = &mut s.s;
        self.for_each_row(span, kv_head, lo, p + 1, |j, at| {
            let key = &self.keys[at..at + d];
            for (gi, qh) in qs.chunks_exact(d).enumerate() {
                probs[gi * n + j] = dot(qh, key) * self.scale2;
            }
        });
        for row in probs.chunks_exact_mut(n) {
            let max = max(f32::NEG_INFINITY, row);
            let inv = 1.0 / exp2_shifted_sum::<M>(row, max);
            row.iter_mut().for_each(|x| *x *= inv);
        }
        let mut out = vec![0f32; g * d];
        self.for_each_row(span, kv_head, lo, p + 1, |j, at| {
            let value = &self.values[at..at + d];
            for (gi, o) in out.chunks_exact_mut(d).enumerate() {
                let w = probs[gi * n + j];
                o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
            }
        });
        out
    }
}
