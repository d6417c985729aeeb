//! Tests of the paged attention kernel against a direct f64 softmax attention.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::*;

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * scale)
        .collect()
}

fn heads(heads: usize, kv_heads: usize, dim: usize) -> Heads {
    Heads {
        heads,
        kv_heads,
        dim,
        scale: 1.0 / (dim as f64).sqrt(),
    }
}

/// A random pool and, per sequence, a block table of distinct, shuffled blocks.
struct Pool {
    keys: Vec<f32>,
    values: Vec<f32>,
    block_size: usize,
    tables: Vec<Vec<u32>>,
}

impl Pool {
    /// Tables for sequences of `lens` positions, with a few unused blocks in the pool.
    fn new(rng: &mut ChaCha8Rng, h: Heads, block_size: usize, lens: &[usize]) -> Self {
        let need: Vec<usize> = lens.iter().map(|n| n.div_ceil(block_size)).collect();
        let blocks = need.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        ids.shuffle(rng);
        let mut tables = vec![];
        let mut at = 0;
        for n in need {
            tables.push(ids[at..at + n].to_vec());
            at += n;
        }
        let size = blocks * block_size * h.kv_heads * h.dim;
        Self {
            keys: randn(rng, size, 1.0),
            values: randn(rng, size, 1.0),
            block_size,
            tables,
        }
    }

    fn layer(&self) -> PagedLayer<'_> {
        PagedLayer {
            keys: &self.keys,
            values: &self.values,
            block_size: self.block_size,
        }
    }

    /// Key and value of kv head `kh` at position `p` of sequence `seq`.
    fn kv(&self, h: Heads, seq: usize, p: usize, kh: usize) -> (&[f32], &[f32]) {
        let bs = self.block_size;
        let slot = self.tables[seq][p / bs] as usize * bs + p % bs;
        let at = (slot * h.kv_heads + kh) * h.dim;
        (&self.keys[at..at + h.dim], &self.values[at..at + h.dim])
    }
}

/// Softmax attention in f64 of one query row (`[heads, dim]`) at position `p` of sequence `seq`.
fn reference(
    q_row: &[f32],
    pool: &Pool,
    seq: usize,
    p: usize,
    h: Heads,
    window: Option<usize>,
) -> Vec<f64> {
    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
    let group = h.heads / h.kv_heads;
    let mut out = vec![0f64; h.heads * h.dim];
    for head in 0..h.heads {
        let qh = &q_row[head * h.dim..(head + 1) * h.dim];
        let scores: Vec<f64> = (lo..=p)
            .map(|k| {
                let (key, _) = pool.kv(h, seq, k, head / group);
                key.iter()
                    .zip(qh)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * h.scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        for (k, s) in (lo..=p).zip(&scores) {
            let (_, value) = pool.kv(h, seq, k, head / group);
            let w = (s - max).exp() / z;
            for (o, v) in out[head * h.dim..(head + 1) * h.dim].iter_mut().zip(value) {
                *o += w * *v as f64;
            }
        }
    }
    out
}

/// Runs one batch of spans `(start, len)` (rows laid out in reverse sequence order) and
/// compares every output element with the f64 reference.
///
/// Why 1e-5 holds: keys, values and queries are O(1) (queries ×1.5 to sharpen the softmax), so
/// scores are O(1) and each is a dot product of ≤ 64 f32 products (error ~ √64 · 2⁻²⁴ · |q||k|
/// ≈ 1e-6 relative); the exponentials are within a few ulp; the outputs are convex
/// combinations of values |v| ≲ 5, whose f32 sums over ≤ 300 terms and the online rescaling
/// (a few multiplications by factors ≤ 1) add errors of order 1e-7 · |v|. The total stays
/// around 1e-6, well inside 1e-5.
fn check_batch(h: Heads, block_size: usize, window: Option<usize>, spans: &[(usize, usize)]) {
    let mut rng = ChaCha8Rng::seed_from_u64((block_size * 131 + h.heads * 7 + h.dim) as u64);
    let lens: Vec<usize> = spans.iter().map(|(s, l)| s + l).collect();
    let pool = Pool::new(&mut rng, h, block_size, &lens);
    let rows: usize = spans.iter().map(|s| s.1).sum();
    let width = h.heads * h.dim;
    let q = randn(&mut rng, rows * width, 1.5);
    let mut seqs = vec![];
    let mut row = rows;
    for (i, &(start, len)) in spans.iter().enumerate() {
        row -= len;
        seqs.push(SeqSpan {
            row,
            len,
            start,
            blocks: &pool.tables[i],
        });
    }
    let got = paged_attention(&q, &seqs, &pool.layer(), h, window).unwrap();
    assert_eq!(got.len(), rows * width);
    let mut want = vec![f64::NAN; rows * width];
    for (i, s) in seqs.iter().enumerate() {
        for k in 0..s.len {
            let r = s.row + k;
            let expect = reference(
                &q[r * width..(r + 1) * width],
                &pool,
                i,
                s.start + k,
                h,
                window,
            );
            want[r * width..(r + 1) * width].copy_from_slice(&expect);
        }
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // A NaN expectation (a row no span covers) fails here too.
        assert!(
            (*g as f64 - w).abs() < 1e-5,
            "{h:?} block {block_size} window {window:?}: row {} col {}: {g} vs {w}",
            i / width,
            i % width
        );
    }
}

/// Decode rows and prefill spans in one call: lengths 1, 7, 129, 130 and 300 (longer than a tile
/// and not multiples of it), GQA (4 and 3 query heads per kv head) and plain multi-head attention,
/// shuffled block tables of 1, 3, 16 and 64 slots, no window and windows of 5 and 150 keys.
#[test]
fn matches_f64_reference() {
    // (128, 129) ends on a key tile of one key (positions 0 ..= 256).
    let spans = [
        (0, 1),
        (37, 1),
        (0, 7),
        (5, 130),
        (0, 300),
        (200, 129),
        (128, 129),
        (299, 1),
    ];
    for h in [heads(8, 2, 20), heads(4, 4, 64), heads(9, 3, 64)] {
        for block_size in [1, 3, 16, 64] {
            for window in [None, Some(5), Some(150)] {
                check_batch(h, block_size, window, &spans);
            }
        }
    }
}

/// A decode-only batch (every span one row), as in a decode step.
#[test]
fn decode_step_matches_reference() {
    let spans = [(0, 1), (1, 1), (16, 1), (63, 1), (500, 1)];
    for window in [None, Some(5)] {
        check_batch(heads(8, 2, 64), 16, window, &spans);
    }
}

/// Positions 0..300 in one span equal the same rows as spans 0..100 and 100..300 (all keys
/// already written).
#[test]
fn chunked_equals_unchunked() {
    let h = heads(9, 3, 64);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for window in [None, Some(40)] {
        let pool = Pool::new(&mut rng, h, 16, &[300]);
        let q = randn(&mut rng, 300 * h.heads * h.dim, 1.5);
        let blocks = &pool.tables[0];
        let span = |row, len, start| SeqSpan {
            row,
            len,
            start,
            blocks,
        };
        let whole = paged_attention(&q, &[span(0, 300, 0)], &pool.layer(), h, window).unwrap();
        let parts = [span(0, 100, 0), span(100, 200, 100)];
        let chunked = paged_attention(&q, &parts, &pool.layer(), h, window).unwrap();
        assert_eq!(whole.len(), chunked.len());
        for (i, (a, b)) in whole.iter().zip(&chunked).enumerate() {
            assert!((a - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }
}

/// Rows that no span covers are zero; spans of no rows are ignored.
#[test]
fn uncovered_rows_are_zero() {
    let h = heads(2, 1, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pool = Pool::new(&mut rng, h, 4, &[5]);
    let q = randn(&mut rng, 4 * 16, 1.0);
    let seqs = [
        SeqSpan {
            row: 1,
            len: 2,
            start: 3,
            blocks: &pool.tables[0],
        },
        SeqSpan {
            row: 9,
            len: 0,
            start: 0,
            blocks: &[],
        },
    ];
    let out = paged_attention(&q, &seqs, &pool.layer(), h, None).unwrap();
    assert!(out[..16].iter().all(|x| *x == 0.0));
    assert!(out[48..].iter().all(|x| *x == 0.0));
    assert!(out[16..48].iter().all(|x| *x != 0.0));
}

#[test]
fn bad_inputs_are_errors() {
    let h = heads(4, 2, 8);
    let (keys, values) = (vec![0f32; 8 * 2 * 2 * 8], vec![0f32; 8 * 2 * 2 * 8]);
    let kv = PagedLayer {
        keys: &keys,
        values: &values,
        block_size: 2,
    };
    let q = vec![0f32; 3 * 4 * 8];
    let blocks = [5u32, 1];
    let span = |row, len, start, blocks| SeqSpan {
        row,
        len,
        start,
        blocks,
    };
    let ok = [span(0, 3, 1, &blocks[..])];
    assert!(paged_attention(&q, &ok, &kv, h, None).is_ok());
    assert!(paged_attention(&q, &ok, &kv, h, Some(2)).is_ok());
    // q not a multiple of heads × dim.
    assert!(paged_attention(&q[1..], &ok, &kv, h, None).is_err());
    // Heads not a multiple of kv heads; no features.
    assert!(paged_attention(&q, &ok, &kv, heads(4, 3, 8), None).is_err());
    assert!(paged_attention(&q, &ok, &kv, heads(4, 0, 8), None).is_err());
    assert!(paged_attention(&[], &[], &kv, heads(4, 2, 0), None).is_err());
    // A span outside q, or overflowing.
    assert!(paged_attention(&q, &[span(1, 3, 1, &blocks[..])], &kv, h, None).is_err());
    assert!(paged_attention(&q, &[span(usize::MAX, 2, 0, &blocks[..])], &kv, h, None).is_err());
    assert!(paged_attention(&q, &[span(0, 2, usize::MAX, &blocks[..])], &kv, h, None).is_err());
    // A block table too short for the span.
    assert!(paged_attention(&q, &[span(0, 3, 2, &blocks[..])], &kv, h, None).is_err());
    assert!(paged_attention(&q, &[span(0, 1, 0, &[])], &kv, h, None).is_err());
    // A block outside the pool (8 blocks of 2 slots).
    assert!(paged_attention(&q, &[span(0, 3, 0, &[1, 8])], &kv, h, None).is_err());
    assert!(paged_attention(&q, &[span(0, 1, 0, &[u32::MAX])], &kv, h, None).is_err());
    // A stale block outside the window is never read, so it is not an error.
    assert!(paged_attention(&q, &[span(0, 1, 4, &[99, 99, 2])], &kv, h, Some(1)).is_ok());
    // Keys and values of different sizes, a pool not made of whole slots, no slots per block.
    let bad = |keys: &[f32], values: &[f32], block_size| {
        let kv = PagedLayer {
            keys,
            values,
            block_size,
        };
        paged_attention(&q, &ok, &kv, h, None).is_err()
    };
    assert!(bad(&keys, &values[16..], 2));
    assert!(bad(&keys[1..], &values[1..], 2));
    assert!(bad(&keys, &values, 0));
    // A window of no keys.
    assert!(paged_attention(&q, &ok, &kv, h, Some(0)).is_err());
}

/// Tiles take whole micro-panels of rows where a whole number of tokens allows it.
#[test]
fn tiles_fill_whole_micro_panels() {
    // (query heads per kv head, panel rows) -> tokens per tile.
    for ((group, panel), want) in [
        ((3, 12), 40),
        ((8, 12), 15),
        ((1, 12), 120),
        ((32, 12), 3),
        ((8, 6), 15),
        ((3, 1), 42),
        ((200, 12), 1),
    ] {
        assert_eq!(
            tile_tokens(group, panel),
            want,
            "group {group}, panel {panel}"
        );
    }
}
