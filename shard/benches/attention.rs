//! Micro benchmark of the paged CPU attention kernel (`model::paged_attention`).
//!
//! ```text
//! cargo bench -p medley-shard --bench attention [-- tinyllama]
//! ```
//!
//! One sequence of SmolLM2-135M's attention shape (9 heads, 3 kv heads, head dim 64; with
//! `tinyllama`, TinyLlama-1.1B's: 32 heads, 4 kv heads, head dim 64) in a pool
//! of 16-slot blocks laid out in shuffled order. For each prompt length: the time of one call
//! attending the whole prompt (prefill, causal), its throughput in GFLOP/s (4 · heads · dim
//! flops per visible query/key pair), and the time of one decode row at the prompt's end. Set
//! `RAYON_NUM_THREADS` to control the CPU threads.

use std::time::{Duration, Instant};

use medley_shard::model::bench_paged_attention;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DIM: usize = 64;
const BLOCK: usize = 16;

/// Median of `runs` timings of `f` after one warm-up call.
fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let (heads, kv_heads) = if std::env::args().any(|a| a == "tinyllama") {
        (32, 4)
    } else {
        (9, 3)
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut randn =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    println!(
        "paged attention, {heads} heads / {kv_heads} kv heads × {DIM}, blocks of {BLOCK}, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "{:>7} {:>14} {:>10} {:>14}",
        "tokens", "prefill (ms)", "GFLOP/s", "decode (µs)"
    );
    for n in [128usize, 512, 1024, 2048, 4096] {
        let blocks_n = n.div_ceil(BLOCK);
        let slot = kv_heads * DIM;
        let keys = randn(blocks_n * BLOCK * slot);
        let values = randn(blocks_n * BLOCK * slot);
        let q = randn(n * heads * DIM);
        let mut blocks: Vec<u32> = (0..blocks_n as u32).collect();
        blocks.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(n as u64));
        let shape = [heads, kv_heads, DIM];
        let runs = (8192 / n).clamp(3, 20);
        let prefill = time(runs, || {
            let out = bench_paged_attention(&q, 0, &keys, &values, BLOCK, &blocks, shape);
            std::hint::black_box(out.map(|o| o.len()).unwrap_or(0));
        });
        let last = &q[(n - 1) * heads * DIM..];
        let decode = time(50, || {
            let out = bench_paged_attention(last, n - 1, &keys, &values, BLOCK, &blocks, shape);
            std::hint::black_box(out.map(|o| o.len()).unwrap_or(0));
        });
        // Make sure the kernel accepts the inputs (the timings above ignore errors).
        bench_paged_attention(&q[..heads * DIM], 0, &keys, &values, BLOCK, &blocks, shape)?;
        let flops = 4.0 * (heads * DIM) as f64 * (n * (n + 1) / 2) as f64;
        println!(
            "{n:>7} {:>14.3} {:>10.1} {:>14.1}",
            prefill.as_secs_f64() * 1e3,
            flops / prefill.as_secs_f64() / 1e9,
            decode.as_secs_f64() * 1e6
        );
    }
    Ok(())
}
