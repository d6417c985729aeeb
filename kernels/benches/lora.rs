//! Throughput of the CPU LoRA kernels on TinyLlama-sized projections: a decode step (16 rows over
//! 8 adapters, rows of one adapter scattered: BGMV) and a prefill (16 segments of 32 rows: SGMV).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p medley-kernels --bench lora
//! ```

use std::time::Instant;

use medley_kernels::cpu::CpuKernels;
use medley_kernels::testing::values;
use medley_kernels::{Factors, RowMapping, Segment, Shape};

fn median_us(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..31)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let (adapters, rank) = (8usize, 16usize);
    println!(
        "CpuKernels::apply, {adapters} adapters of rank {rank}, median µs, {} threads\n",
        rayon::current_num_threads()
    );
    println!(
        "| projection (in → out) | decode 16 rows (BGMV) | GFLOP/s | prefill 512 rows (SGMV) | GFLOP/s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, inf, outf) in [
        ("q/o", 2048, 2048),
        ("k/v", 2048, 256),
        ("gate/up", 2048, 5632),
        ("down", 5632, 2048),
    ] {
        let fac: Vec<(Vec<f32>, Vec<f32>)> = (0..adapters)
            .map(|i| {
                (
                    values(rank * inf, i as u64),
                    values(rank * outf, 100 + i as u64),
                )
            })
            .collect();
        let factors: Vec<Factors<'_, [f32]>> = fac
            .iter()
            .map(|(a, b)| Factors {
                rank,
                a: a.as_slice(),
                b_t: b.as_slice(),
            })
            .collect();
        let mut cells = Vec::new();
        for rows in [16usize, 512] {
            let x = values(rows * inf, 7);
            let mut y = values(rows * outf, 8);
            let table: Vec<u32> = (0..rows as u32).map(|r| r % adapters as u32).collect();
            let per = rows / 16;
            let segs: Vec<Segment> = (0..16)
                .map(|s| Segment {
                    start: s * per,
                    len: per,
                    adapter: s % adapters,
                })
                .collect();
            let mapping = if rows == 16 {
                RowMapping::PerRow(&table)
            } else {
                RowMapping::Segments(&segs)
            };
            let us = median_us(|| {
                CpuKernels
                    .apply(
                        Shape {
                            rows,
                            in_features: inf,
                            out_features: outf,
                        },
                        &x,
                        mapping,
                        &factors,
                        &mut y,
                    )
                    .expect("kernel");
            });
            let flops = 2.0 * rows as f64 * rank as f64 * (inf + outf) as f64;
            cells.push((us, flops / us / 1e3));
        }
        println!(
            "| {name} ({inf} → {outf}) | {:.0} | {:.1} | {:.0} | {:.1} |",
            cells[0].0, cells[0].1, cells[1].0, cells[1].1
        );
    }
}
