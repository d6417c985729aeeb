//! `matmul_nt` (`y = x Wᵀ`) against candle 0.11's CPU matmul on TinyLlama's (or SmolLM2-135M's)
//! projection shapes, for the row counts of decode batches (or, with `--rows`, prefill chunks).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-kernels --bench matmul [-- --isa avx2|avx512|portable] [--rows 1,16] [--shapes tinyllama|smollm2]
//! ```
//!
//! "kernel" is `matmul_nt`'s choice for the row count (streaming below
//! `Isa::packed_min_rows` rows, the packed gemm from there), "other algo" the other one.
//! Every cell is the median of several calls. Small weights are cycled through enough copies
//! (64 MiB or more) that `W` comes from DRAM, as it does in a forward pass over a whole model.
//! GB/s counts the bytes of `W` (and `x`, `y`) read or written once per call.

use candle_core::{Device, Tensor};
use medley_kernels::Shape;
use medley_kernels::matmul::{Algo, Isa, matmul_nt_algo};
use medley_kernels::testing::{median_s, values};

struct Args {
    isa: Isa,
    rows: Vec<usize>,
    /// `(out_features, in_features)` of the projections.
    shapes: Vec<(usize, usize)>,
}

/// TinyLlama-1.1B: q/o, k/v, gate/up, down, lm_head.
const TINYLLAMA: [(usize, usize); 5] = [
    (2048, 2048),
    (256, 2048),
    (5632, 2048),
    (2048, 5632),
    (32000, 2048),
];

/// SmolLM2-135M: q/o, k/v, gate/up, down.
const SMOLLM2: [(usize, usize); 4] = [(576, 576), (192, 576), (1536, 576), (576, 1536)];

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        isa: Isa::detect(),
        rows: vec![1, 4, 8, 16, 32, 64],
        shapes: TINYLLAMA.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--isa" => {
                args.isa = match it.next().as_deref() {
                    Some("avx512") => Isa::Avx512,
                    Some("avx2") => Isa::Avx2Fma,
                    Some("portable") => Isa::Portable,
                    other => return Err(format!("--isa avx512|avx2|portable, got {other:?}")),
                }
            }
            "--rows" => {
                let list = it.next().ok_or("--rows needs a list")?;
                args.rows = list
                    .split(',')
                    .map(|v| v.parse().map_err(|e| format!("--rows {v}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--shapes" => {
                args.shapes = match it.next().as_deref() {
                    Some("tinyllama") => TINYLLAMA.to_vec(),
                    Some("smollm2") => SMOLLM2.to_vec(),
                    other => return Err(format!("--shapes tinyllama|smollm2, got {other:?}")),
                }
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !args.isa.is_available() {
        return Err(format!("this CPU cannot run {:?}", args.isa));
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    println!(
        "y = x Wᵀ, f32, median per call, {} rayon threads, kernel {:?}\n",
        rayon::current_num_threads(),
        args.isa
    );
    println!(
        "| N × K | M | kernel µs | GFLOP/s | GB/s | other algo µs | candle x·Wᵀ µs | GFLOP/s | candle (W·xᵀ)ᵀ µs | GFLOP/s | speed-up vs best candle |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let dev = Device::Cpu;
    for &(n, k) in &args.shapes {
        let w_bytes = n * k * 4;
        let copies = (64usize << 20).div_ceil(w_bytes);
        let ws: Vec<Vec<f32>> = (0..copies).map(|c| values(n * k, c as u64)).collect();
        let wt: Vec<Tensor> = ws
            .iter()
            .map(|w| Tensor::from_slice(w, (n, k), &dev))
            .collect::<Result<_, _>>()?;
        for &m in &args.rows {
            let shape = Shape {
                rows: m,
                in_features: k,
                out_features: n,
            };
            let x = values(m * k, 99);
            let xt = Tensor::from_slice(&x, (m, k), &dev)?;
            let mut y = vec![0f32; m * n];
            let algo = Algo::for_rows(args.isa, m);
            let other = match algo {
                Algo::Streaming => Algo::Packed,
                Algo::Packed => Algo::Streaming,
            };
            let mut time = |a: Algo| {
                median_s(copies, |c| {
                    matmul_nt_algo(args.isa, a, shape, &x, &ws[c], &mut y).expect("kernel");
                })
            };
            let ours = time(algo);
            let theirs = time(other);
            let plain = median_s(copies, |c| {
                let _ = xt.matmul(&wt[c].t().expect("t")).expect("matmul");
            });
            let trick = median_s(copies, |c| {
                let _ = wt[c]
                    .matmul(&xt.t().expect("t"))
                    .and_then(|p| p.t())
                    .and_then(|p| p.contiguous())
                    .expect("matmul");
            });
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = (w_bytes + 4 * m * (k + n)) as f64;
            let gf = |s: f64| flops / s / 1e9;
            println!(
                "| {n} × {k} | {m} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2}× |",
                ours * 1e6,
                gf(ours),
                bytes / ours / 1e9,
                theirs * 1e6,
                plain * 1e6,
                gf(plain),
                trick * 1e6,
                gf(trick),
                plain.min(trick) / ours
            );
        }
    }
    Ok(())
}
