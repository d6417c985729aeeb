//! Names and launch shapes of the CUDA kernels (`kernels/cuda/*.cu`), in plain Rust: the CUDA
//! launchers (`cuda`, with the `cuda` feature) and the CPU emulation tests
//! (`kernels/emu`) launch the same grids from here.
//!
//! Launch shapes (one thread block per row or segment, and per slice of the output):
//! * shrink: grid `(rows or segments, max rank)`, block 256 (the block's threads share one `j`'s
//!   dot product);
//! * expand: grid `(rows or segments, ceil(out / 256))`, block 256;
//! * grouped BGMV: one block per adapter instead of per row (see [`grouped_splits`]).
//!
//! Segments travel as `u32` triples `(start, len, adapter)`; per-row mappings as one `u32` per
//! row ([`crate::NO_ADAPTER`] skips the row); adapters as device arrays of factor pointers and
//! ranks, one entry per (adapter, part) when a launch serves several projections side by side
//! (up to [`MAX_PARTS`]), with the parts' end columns. Ranks are at most [`MAX_RANK`] per part in
//! one launch (larger ones take several passes, [`rank_passes`]); the launch shapes' `max_rank`
//! is the largest sum over one adapter's parts.

/// Activation types of the fused kernels.
pub const FUSED_DTYPES: [&str; 2] = ["bf16", "f16"];

/// For each kernel kind, its names for the activation types of [`DTYPES`], in order, as string
/// literals (`medley_<kind>_f32`, `_bf16`, `_f16`): the launchers look kernels up by them on
/// every call, with no name to format.
macro_rules! names_by_dtype {
    ($($kind:literal),+) => {
        [$([
            concat!("medley_", $kind, "_f32"),
            concat!("medley_", $kind, "_bf16"),
            concat!("medley_", $kind, "_f16"),
        ]),+]
    };
}

/// A name that no kernel has, for an activation type without kernels (loading it fails with
/// the name in the error).
const NO_SUCH_DTYPE: &str = "medley_kernel_for_an_unsupported_dtype";

/// The names of `kinds` (from [`names_by_dtype`]) for activations of type `dtype`.
fn pick<const N: usize>(kinds: &[[&'static str; 3]; N], dtype: &str) -> [&'static str; N] {
    let index = DTYPES.iter().position(|d| *d == dtype);
    kinds.map(|k| index.map_or(NO_SUCH_DTYPE, |i| k[i]))
}

const FUSED_NAMES: [[&str; 3]; 3] = names_by_dtype!("rms_norm", "silu_mul", "add_rms_norm");
const ATTENTION_NAMES: [[&str; 3]; 3] =
    names_by_dtype!("kv_write", "paged_attention", "rope_kv_write");
const LORA_NAMES: [[&str; 3]; 4] =
    names_by_dtype!("bgmv_shrink", "sgmv_shrink", "bgmv_expand", "sgmv_expand");
const GROUPED_NAMES: [[&str; 3]; 2] = names_by_dtype!("bgmv_shrink_grouped", "bgmv_expand_grouped");
const FUSED_BGMV_NAMES: [[&str; 3]; 2] = names_by_dtype!("bgmv_fused", "bgmv_fused_grouped");

/// The fused kernel names for activations of type `dtype` (one of [`FUSED_DTYPES`]): RMSNorm,
/// SiLU·mul, residual add + RMSNorm.
pub fn fused_kernel_names(dtype: &str) -> [&'static str; 3] {
    pick(&FUSED_NAMES, dtype)
}

/// The `(grid, block)` of a fused RMSNorm (or residual add + RMSNorm) over `rows` rows.
pub fn rms_norm_launch(rows: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((rows.max(1), 1, 1), (256, 1, 1))
}

/// The `(grid, block)` of a fused SiLU·mul over `n` elements.
pub fn elementwise_launch(n: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((n.div_ceil(256).max(1), 1, 1), (256, 1, 1))
}

/// The greedy kernel (`kernels/cuda/sampling.cu`): each f32 logits row's argmax and its
/// log-probability.
pub const GREEDY_KERNEL: &str = "medley_greedy_f32";

/// The `(grid, block)` of the greedy kernel over `rows` logits rows: one block per row.
pub fn greedy_launch(rows: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((rows.max(1), 1, 1), (256, 1, 1))
}

/// The row-gather kernel (`kernels/cuda/gather.cu`) for values of `bytes` bytes (2: bf16/f16,
/// 4: f32/u32); `None` for other sizes.
pub fn gather_kernel_name(bytes: usize) -> Option<&'static str> {
    match bytes {
        2 => Some("medley_gather_rows_b16"),
        4 => Some("medley_gather_rows_b32"),
        _ => None,
    }
}

/// The `(grid, block)` of a row gather of `rows` rows of `width` values: one block row per
/// output row, 256 values per block.
pub fn gather_launch(rows: u32, width: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((rows.max(1), width.div_ceil(256).max(1), 1), (256, 1, 1))
}

/// Largest head dimension the attention kernel holds in registers.
pub const MAX_HEAD_DIM: usize = 256;

/// The attention kernel names for activations of type `dtype` (one of [`DTYPES`]): the KV
/// write, the paged attention, the rotary embedding with the KV write.
pub fn attention_kernel_names(dtype: &str) -> [&'static str; 3] {
    pick(&ATTENTION_NAMES, dtype)
}

/// The `(grid, block)` of a KV write, or a rotary embedding with the KV write, over `rows`
/// rows.
pub fn kv_write_launch(rows: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((rows.max(1), 1, 1), (256, 1, 1))
}

/// The `(grid, block)` of a paged attention launch: one block of 4 warps per (row, query head).
pub fn attention_launch(rows: u32, heads: u32) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((rows.max(1), heads.max(1), 1), (128, 1, 1))
}

/// Largest rank of one adapter's factors for one projection in one launch (the expand kernels
/// stage [`MAX_PARTS`] of them per row in shared memory). A larger rank goes through several
/// launches, each over a slice of it ([`rank_passes`], [`RankSlice`]).
pub const MAX_RANK: usize = 128;

/// The slice of a factor pair's rank that one pass of launches takes: rows
/// `first .. first + rank` of `A` (`[r, in]`) and of `scale · Bᵀ` (`[r, out]`). The LoRA product
/// is a sum over its rank, `x Aᵀ Bᵀ = Σ_j (x · A[j, :]) B[:, j]`, so the passes' products, each
/// added to `y`, add up to the whole; a pass whose slice is empty leaves the entry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    /// The slice's first row of `A` and `Bᵀ`.
    pub first: usize,
    /// Its rows (at most [`MAX_RANK`]; 0 when the rank ends before this pass).
    pub rank: usize,
}

impl RankSlice {
    /// Pass `pass`'s slice of a rank-`rank` factor pair.
    pub fn of(rank: usize, pass: usize) -> Self {
        let first = pass.saturating_mul(MAX_RANK).min(rank);
        Self {
            first,
            rank: (rank - first).min(MAX_RANK),
        }
    }
}

/// The passes a call over factor pairs of these ranks takes: one per [`MAX_RANK`] of the
/// largest (at least one).
pub fn rank_passes(ranks: impl IntoIterator<Item = usize>) -> usize {
    ranks
        .into_iter()
        .map(|r| r.div_ceil(MAX_RANK))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// Most projections one launch pair serves (their outputs side by side: q, k and v).
pub const MAX_PARTS: usize = 3;

/// Activation types the kernels are built for (the suffix of their names).
pub const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];

/// The kernel names for activations of type `dtype` (one of [`DTYPES`]): BGMV shrink, SGMV
/// shrink, BGMV expand, SGMV expand.
pub fn kernel_names(dtype: &str) -> [&'static str; 4] {
    pick(&LORA_NAMES, dtype)
}

/// The grouped BGMV kernel names for activations of type `dtype` (one of [`DTYPES`]): shrink,
/// expand. They take a decode step's rows one adapter per block (see `lora.cu`), so an adapter's
/// factors are read once per block instead of once per row.
pub fn grouped_kernel_names(dtype: &str) -> [&'static str; 2] {
    pick(&GROUPED_NAMES, dtype)
}

/// The fused BGMV kernel's name for activations of type `dtype` (one of [`DTYPES`]): a decode
/// step's shrink and expand in one launch (see `lora.cu`).
pub fn fused_bgmv_kernel_name(dtype: &str) -> &'static str {
    pick(&FUSED_BGMV_NAMES, dtype)[0]
}

/// The fused grouped BGMV kernel's name for activations of type `dtype` (one of [`DTYPES`]):
/// the grouped shrink and expand in one launch.
pub fn fused_grouped_kernel_name(dtype: &str) -> &'static str {
    pick(&FUSED_BGMV_NAMES, dtype)[1]
}

/// The fused BGMV kernels' counters ahead of their per-row (fused grouped: per-adapter) ones (a
/// launch over `rows` rows needs `FUSED_BGMV_SYNC_WORDS + rows` u32, zero before it; it leaves
/// them zero).
pub const FUSED_BGMV_SYNC_WORDS: usize = 2;

/// Most rows a fused BGMV launch takes (the size of its per-row counters).
pub const FUSED_BGMV_MAX_ROWS: usize = 8192;

/// The `(grid, block)` of a fused BGMV launch over `rows` rows: one block per shrink item
/// (row, j < `max_rank`) and per expand item (row, 256 outputs), in one dimension.
pub fn fused_bgmv_launch(
    rows: u32,
    max_rank: u32,
    out_features: u32,
) -> ((u32, u32, u32), (u32, u32, u32)) {
    let items = rows * (max_rank.max(1) + out_features.div_ceil(256).max(1));
    ((items.max(1), 1, 1), (256, 1, 1))
}

/// The `(grid, block, shared bytes)` of a fused grouped BGMV launch over `rows` rows of
/// `adapters` adapters whose shrink splits the input `splits` ways ([`grouped_splits`]): the
/// grouped shrink's blocks then the grouped expand's, in one dimension.
pub fn fused_grouped_launch(
    adapters: u32,
    max_rank: u32,
    splits: u32,
    out_features: u32,
    rows: u32,
) -> ((u32, u32, u32), (u32, u32, u32), u32) {
    let ((sx, sy, sz), block, shared) = grouped_shrink_launch(adapters, max_rank, splits, rows);
    let ((ex, ey, _), _, _) = grouped_expand_launch(adapters, out_features, rows);
    ((sx * sy * sz + ex * ey, 1, 1), block, shared)
}

/// Most rows a grouped BGMV launch takes (their list sits in shared memory, 4 bytes a row).
pub const GROUPED_MAX_ROWS: usize = 8192;

/// Blocks a grouped shrink aims for (two per SM of a 132-SM H100/H200): the input dimension is
/// split until the launch has about this many.
const GROUPED_TARGET_BLOCKS: u32 = 264;

/// How a grouped shrink splits the `in_features` dimension for `adapters` adapters of rank up
/// to `max_rank`: `(splits, split_len)`, `split_len` a multiple of 32 (a warp's stride) of at
/// least 256 values, and `splits * split_len >= in_features`.
pub fn grouped_splits(adapters: u32, max_rank: u32, in_features: u32) -> (u32, u32) {
    let blocks = adapters.max(1) * max_rank.div_ceil(8).max(1);
    let wanted = GROUPED_TARGET_BLOCKS.div_ceil(blocks).max(1);
    let most = (in_features / 256).max(1);
    let len = in_features
        .div_ceil(wanted.min(most))
        .next_multiple_of(32)
        .max(32);
    (in_features.div_ceil(len).max(1), len)
}

/// The `(grid, block, shared bytes)` of a grouped shrink over `rows` rows.
pub fn grouped_shrink_launch(
    adapters: u32,
    max_rank: u32,
    splits: u32,
    rows: u32,
) -> ((u32, u32, u32), (u32, u32, u32), u32) {
    (
        (adapters.max(1), max_rank.div_ceil(8).max(1), splits.max(1)),
        (256, 1, 1),
        4 * rows,
    )
}

/// The `(grid, block, shared bytes)` of a grouped expand over `rows` rows.
pub fn grouped_expand_launch(
    adapters: u32,
    out_features: u32,
    rows: u32,
) -> ((u32, u32, u32), (u32, u32, u32), u32) {
    (
        (adapters.max(1), out_features.div_ceil(256).max(1), 1),
        (256, 1, 1),
        4 * rows,
    )
}

/// Rows of one segment an SGMV block takes (`SGMV_ROWS` in `lora.cu`).
pub const SGMV_ROWS: u32 = 4;

/// The `(grid, block)` of a shrink launch over `units` rows (BGMV, `longest` 1) or segments
/// (SGMV, `longest` = the longest segment's rows).
pub fn shrink_launch(
    units: u32,
    max_rank: u32,
    longest: u32,
) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((units, max_rank.max(1), row_blocks(longest)), (256, 1, 1))
}

/// The `(grid, block)` of an expand launch over `units` rows or segments (`longest` as for
/// [`shrink_launch`]).
pub fn expand_launch(
    units: u32,
    out_features: u32,
    longest: u32,
) -> ((u32, u32, u32), (u32, u32, u32)) {
    (
        (
            units,
            out_features.div_ceil(256).max(1),
            row_blocks(longest),
        ),
        (256, 1, 1),
    )
}

/// Blocks along a segment of `rows` rows.
fn row_blocks(rows: u32) -> u32 {
    rows.div_ceil(SGMV_ROWS).max(1)
}

/// Segments in the kernels' wire form: `(start, len, adapter)` triples.
pub fn segment_triples(segments: &[crate::Segment]) -> Vec<u32> {
    segments
        .iter()
        .flat_map(|s| [s.start as u32, s.len as u32, s.adapter as u32])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_slices_cover_each_rank_once_in_passes_of_max_rank() {
        assert_eq!(rank_passes([]), 1);
        assert_eq!(rank_passes([0, 0]), 1);
        assert_eq!(rank_passes([8, 128]), 1);
        assert_eq!(rank_passes([8, 129]), 2);
        assert_eq!(rank_passes([256, 16]), 2);
        assert_eq!(rank_passes([4, 300, 200]), 3);
        for rank in [0, 1, 8, 127, 128, 129, 192, 255, 256, 257, 300, 1024] {
            let passes = rank_passes([rank, 8]);
            let mut next = 0;
            for pass in 0..passes + 2 {
                let slice = RankSlice::of(rank, pass);
                assert!(slice.rank <= MAX_RANK, "{rank} {pass}: {slice:?}");
                if slice.rank > 0 {
                    assert_eq!(slice.first, next, "{rank} {pass}: slices in order, no gap");
                    assert!(pass < passes, "{rank} {pass}: no slice past the passes");
                }
                next = slice.first + slice.rank;
            }
            assert_eq!(next, rank, "{rank}: the slices end at the rank");
        }
        assert_eq!(
            RankSlice::of(300, 2),
            RankSlice {
                first: 256,
                rank: 44
            }
        );
        assert_eq!(
            RankSlice::of(100, 1),
            RankSlice {
                first: 100,
                rank: 0
            }
        );
        assert_eq!(
            RankSlice::of(5, usize::MAX),
            RankSlice { first: 5, rank: 0 }
        );
    }

    #[test]
    fn grouped_splits_cover_the_input_in_warp_multiples() {
        for adapters in [1, 3, 8, 64] {
            for rank in [1, 8, 16, 64, 128] {
                for inf in [1, 31, 64, 257, 511, 1000, 2048, 4096, 14336] {
                    let (splits, len) = grouped_splits(adapters, rank, inf);
                    assert!(len % 32 == 0 && len >= 32, "{adapters} {rank} {inf}: {len}");
                    assert!(splits * len >= inf, "{adapters} {rank} {inf}");
                    // No split starts past the end (every split has work).
                    assert!((splits - 1) * len < inf.max(1), "{adapters} {rank} {inf}");
                    let blocks = adapters * rank.div_ceil(8);
                    // Split only while the launch is short of blocks, into slices of 256+.
                    if blocks >= GROUPED_TARGET_BLOCKS || inf <= 256 {
                        assert_eq!(splits, 1, "{adapters} {rank} {inf}");
                    }
                    if splits > 1 {
                        assert!(len >= 256, "{adapters} {rank} {inf}: {len}");
                    }
                }
            }
        }
        // 8 adapters of rank 16 over 4096 inputs: 16 blocks, split 16 ways (256 each).
        assert_eq!(grouped_splits(8, 16, 4096), (16, 256));
        // Rank 64: 64 blocks, 5 wanted, 820 → 832 values a split.
        assert_eq!(grouped_splits(8, 64, 4096), (5, 832));
        assert_eq!(
            grouped_shrink_launch(8, 16, 16, 32),
            ((8, 2, 16), (256, 1, 1), 128)
        );
        assert_eq!(
            grouped_expand_launch(8, 4099, 32),
            ((8, 17, 1), (256, 1, 1), 128)
        );
    }

    #[test]
    fn launch_shapes_cover_every_rank_and_output() {
        assert_eq!(shrink_launch(5, 16, 1), ((5, 16, 1), (256, 1, 1)));
        assert_eq!(shrink_launch(5, 17, 1), ((5, 17, 1), (256, 1, 1)));
        assert_eq!(shrink_launch(1, 128, 1), ((1, 128, 1), (256, 1, 1)));
        assert_eq!(shrink_launch(1, 0, 1), ((1, 1, 1), (256, 1, 1)));
        assert_eq!(expand_launch(3, 2048, 1), ((3, 8, 1), (256, 1, 1)));
        assert_eq!(expand_launch(3, 2049, 1), ((3, 9, 1), (256, 1, 1)));
        // A 32-row segment spreads over 8 blocks of 4 rows; 33 rows over 9.
        assert_eq!(shrink_launch(1, 16, 32), ((1, 16, 8), (256, 1, 1)));
        assert_eq!(expand_launch(2, 256, 33), ((2, 1, 9), (256, 1, 1)));
        // 32 rows of rank 16 into 4096 outputs: 512 shrink items and 512 expand items.
        assert_eq!(fused_bgmv_launch(32, 16, 4096), ((1024, 1, 1), (256, 1, 1)));
        assert_eq!(fused_bgmv_launch(3, 0, 257), ((9, 1, 1), (256, 1, 1)));
        // 8 adapters of rank 16 split 16 ways: 8 × 2 × 16 shrink blocks, 8 × 16 expand blocks.
        assert_eq!(
            fused_grouped_launch(8, 16, 16, 4096, 32),
            ((384, 1, 1), (256, 1, 1), 128)
        );
    }

    #[test]
    fn kernel_names_follow_the_dtype() {
        assert_eq!(
            kernel_names("bf16"),
            [
                "medley_bgmv_shrink_bf16",
                "medley_sgmv_shrink_bf16",
                "medley_bgmv_expand_bf16",
                "medley_sgmv_expand_bf16"
            ]
        );
        assert_eq!(
            grouped_kernel_names("f32")[1],
            "medley_bgmv_expand_grouped_f32"
        );
        assert_eq!(fused_bgmv_kernel_name("f16"), "medley_bgmv_fused_f16");
        assert_eq!(fused_bgmv_kernel_name("u8"), NO_SUCH_DTYPE);
        assert_eq!(
            fused_grouped_kernel_name("bf16"),
            "medley_bgmv_fused_grouped_bf16"
        );
        assert_eq!(attention_kernel_names("f16")[2], "medley_rope_kv_write_f16");
        assert_eq!(fused_kernel_names("bf16")[0], "medley_rms_norm_bf16");
        assert_eq!(fused_kernel_names("i64"), [NO_SUCH_DTYPE; 3]);
    }

    #[test]
    fn segments_become_triples() {
        let segs = [
            crate::Segment {
                start: 0,
                len: 3,
                adapter: 1,
            },
            crate::Segment {
                start: 5,
                len: 2,
                adapter: 0,
            },
        ];
        assert_eq!(segment_triples(&segs), [0, 3, 1, 5, 2, 0]);
    }
    #[test]
    fn attention_and_fused_launch_shapes() {
        assert_eq!(elementwise_launch(257), ((2, 1, 1), (256, 1, 1)));
        assert_eq!(rms_norm_launch(3), ((3, 1, 1), (256, 1, 1)));
        assert_eq!(attention_launch(3, 32), ((3, 32, 1), (128, 1, 1)));
        assert_eq!(kv_write_launch(0), ((1, 1, 1), (256, 1, 1)));
    }
}
