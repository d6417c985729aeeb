//! Latency of the shared-memory CPU communicator (`medley_shard::comm::ShmComm`): all-reduce of
//! the activation sizes a tensor-parallel Llama step needs (rows x hidden f32, TinyLlama's
//! hidden 2048), and a bare barrier, with each rank a process of its own.
//!
//! ```text
//! cargo bench -p medley-shard --bench comm -- --world 2
//! ```
//!
//! A TinyLlama step all-reduces twice per layer (after o_proj and down_proj): 44 times per step.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use medley_shard::comm::{Comm, ShmComm, ShmCommConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Hidden size (values per row).
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Rows to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024")]
    rows: Vec<usize>,
    /// Time per size.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Internal: run as this rank of the group at `--path`.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    #[arg(long, hide = true)]
    path: Option<PathBuf>,
    // cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Times every size on this rank; rank 0 prints the table. Every rank runs the same number of
/// iterations (rank 0 decides it and broadcasts it).
fn run_rank(args: &Args, comm: &ShmComm) -> anyhow::Result<()> {
    let mut report = Vec::new();
    let mut sizes: Vec<Option<usize>> = args.rows.iter().map(|&r| Some(r)).collect();
    sizes.push(None); // the barrier
    for rows in sizes {
        let n = rows.map_or(0, |r| r * args.hidden);
        let mut buf: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let op = |buf: &mut Vec<f32>| -> anyhow::Result<()> {
            match rows {
                Some(_) => comm.all_reduce_sum(buf)?,
                None => comm.barrier()?,
            }
            Ok(())
        };
        // Calibrate for 100 ms of rank 0's clock (rank 0 decides when to stop), then agree on
        // the count.
        let t0 = Instant::now();
        let mut calib = 0usize;
        loop {
            op(&mut buf)?;
            calib += 1;
            let mut flag = [f32::from(u8::from(
                t0.elapsed() >= Duration::from_millis(100),
            ))];
            comm.broadcast(&mut flag, 0)?;
            if flag[0] > 0.0 && calib >= 3 {
                break;
            }
        }
        let per = t0.elapsed().as_secs_f64() / calib as f64;
        let mut iters = [((args.seconds / per) as f32).max(10.0)];
        comm.broadcast(&mut iters, 0)?;
        let iters = iters[0] as usize;
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            op(&mut buf)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
        report.push((rows, n, iters, us));
    }
    if comm.rank() == 0 {
        println!(
            "shared-memory communicator, {} ranks (processes), hidden {}",
            args.world, args.hidden
        );
        println!(
            "| op | rows | values | iterations | µs per op | GB/s (values in + out per rank) |"
        );
        println!("|---|---|---|---|---|---|");
        for (rows, n, iters, us) in report {
            match rows {
                Some(r) => println!(
                    "| all_reduce_sum | {r} | {n} | {iters} | {us:.1} | {:.2} |",
                    (2 * n * 4) as f64 / (us * 1e3)
                ),
                None => println!("| barrier | - | - | {iters} | {us:.2} | - |"),
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(rank), Some(path)) = (args.rank, args.path.clone()) {
        let comm = ShmComm::join(&ShmCommConfig::new(path, rank, args.world))?;
        return run_rank(&args, &comm);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench-group");
    let exe = std::env::current_exe()?;
    let children = (1..args.world)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .arg("--rank")
                .arg(rank.to_string())
                .arg("--path")
                .arg(&path)
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let comm = ShmComm::join(&ShmCommConfig::new(&path, 0, args.world))?;
    run_rank(&args, &comm)?;
    for mut c in children {
        let status = c.wait()?;
        anyhow::ensure!(status.success(), "a rank failed: {status}");
    }
    Ok(())
}
