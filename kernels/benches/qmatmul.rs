//! `qmatmul_nt` (kept GGML blocks × f32 activations) against the f32 kernel `matmul_nt` on
//! TinyLlama's projection shapes, for the row counts of decode batches.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-kernels --bench qmatmul [-- --rows 1,2,4,16] [--formats q4_0,q4_1,q8_0]
//! ```
//!
//! Weights are random f32 values quantized by candle (the layout a GGUF file holds), repacked
//! as the shard does at load. Every cell
//! is the median of several calls, cycling through enough copies of `W` (64 MiB or more) that it
//! comes from DRAM, as in a forward pass over a whole model. GB/s counts the bytes of `W` read
//! once per call; GMAC/s the multiply-adds.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use medley_kernels::Shape;
use medley_kernels::matmul::matmul_nt;
use medley_kernels::qmatmul::{Packed, QFormat, qmatmul_nt};
use medley_kernels::testing::{median_s, values};

struct Args {
    rows: Vec<usize>,
    formats: Vec<(QFormat, GgmlDType)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rows: vec![1, 2, 4, 16],
        formats: vec![
            (QFormat::Q4_0, GgmlDType::Q4_0),
            (QFormat::Q4_1, GgmlDType::Q4_1),
            (QFormat::Q8_0, GgmlDType::Q8_0),
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rows" => {
                let list = it.next().ok_or("--rows needs a list")?;
                args.rows = list
                    .split(',')
                    .map(|v| v.parse().map_err(|e| format!("--rows {v}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--formats" => {
                let list = it.next().ok_or("--formats needs a list")?;
                args.formats = list
                    .split(',')
                    .map(|f| match f {
                        "q4_0" => Ok((QFormat::Q4_0, GgmlDType::Q4_0)),
                        "q4_1" => Ok((QFormat::Q4_1, GgmlDType::Q4_1)),
                        "q8_0" => Ok((QFormat::Q8_0, GgmlDType::Q8_0)),
                        other => Err(format!("--formats q4_0|q4_1|q8_0, got {other}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    println!(
        "y = x Wᵀ, W kept quantized vs f32, median per call, {} rayon threads\n",
        rayon::current_num_threads()
    );
    println!("| N × K | format | M | kept µs | GMAC/s | W GB/s | f32 µs | speed-up vs f32 |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let dev = Device::Cpu;
    for (n, k) in [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)] {
        let copies = (64usize << 20).div_ceil(n * k * 4);
        let ws: Vec<Vec<f32>> = (0..copies).map(|c| values(n * k, c as u64)).collect();
        for &(format, dtype) in &args.formats {
            let bytes = n * k / 32 * format.block_bytes();
            let q_copies = (64usize << 20).div_ceil(bytes);
            let qs: Vec<Packed> = (0..q_copies)
                .map(|c| {
                    let w = &ws[c % copies];
                    let t = Tensor::from_slice(w, (n, k), &dev)?;
                    // Distinct copies: a copy reused within the cycle would stay in cache.
                    let t = (t + c as f64 * 1e-3)?;
                    let q = QTensor::quantize(&t, dtype)?;
                    Ok(Packed::new(format, n, k, &q.data()?)?)
                })
                .collect::<Result<_, Box<dyn std::error::Error>>>()?;
            for &m in &args.rows {
                let shape = Shape {
                    rows: m,
                    in_features: k,
                    out_features: n,
                };
                let x = values(m * k, 99);
                let mut y = vec![0f32; m * n];
                let kept = median_s(q_copies, |c| {
                    qmatmul_nt(shape, &x, &qs[c], &mut y).expect("kernel");
                });
                let dense = median_s(copies, |c| {
                    matmul_nt(shape, &x, &ws[c], &mut y).expect("kernel");
                });
                let macs = (m * n * k) as f64;
                println!(
                    "| {n} × {k} | {format:?} | {m} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2}× |",
                    kept * 1e6,
                    macs / kept / 1e9,
                    qs[0].bytes() as f64 / kept / 1e9,
                    dense * 1e6,
                    dense / kept
                );
            }
        }
    }
    Ok(())
}
