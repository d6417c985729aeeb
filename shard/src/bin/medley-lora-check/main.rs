//! `medley-lora-check`: checks the batched LoRA kernels on a device against the reference loops
//! and measures their bandwidth (part of `scripts/gpu-check.sh`).
//!
//! ```text
//! medley-lora-check --device cuda:0            # correctness table; exit 1 on a failure
//! medley-lora-check --device cuda:0 --bench    # ... and the bandwidth table
//! ```
//!
//! Correctness: random inputs, BGMV (decode tables with rows that have no adapter) and SGMV
//! (ragged prefill segments with gaps), ranks 8/16/64/128 alone and mixed, f32/bf16/f16
//! activations with f32 factors, compared with `medley_kernels::reference` (f64 accumulation);
//! rows without an adapter must stay unchanged bit for bit. On a GPU, the paged attention
//! kernels too (a mixed prefill/decode step against an f64 reference, see
//! `medley_shard::model::check_paged_attention`) and the fused half-precision RMSNorm and
//! SiLU·mul (against the candle op chains they replace, `check_fused_ops`). Bandwidth: decode rows over
//! 8B-class projections, against a device-to-device copy measured in the same run.

mod bench;
mod cases;

use std::process::ExitCode;

use candle_core::DType;
use clap::Parser;
use medley_shard::adapters::lora_op::{
    BgmvKernels, FUSED_SEGMENT_ROWS, KernelRows, set_bgmv_kernels,
};
use medley_shard::device::DeviceSpec;

#[derive(Parser)]
#[command(
    version,
    about = "Check and measure Medley's batched LoRA kernels on a device"
)]
struct Cli {
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu", value_parser = DeviceSpec::parse_flag)]
    device: DeviceSpec,
    /// Also measure bandwidth.
    #[arg(long)]
    bench: bool,
    /// Timed iterations per bandwidth row.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// The BGMV kernel sets decode rows go through on a GPU, comma-separated (row, grouped,
    /// fused, fused-grouped); default all. The CPU has one.
    #[arg(long, value_delimiter = ',', value_parser = parse_bgmv)]
    bgmv: Vec<BgmvKernels>,
    /// Only the LoRA kernels: no attention, fused or greedy checks and no table of op costs (a
    /// second run over other BGMV sets, apart from the first should one of them fail).
    #[arg(long)]
    lora_only: bool,
}

fn parse_bgmv(name: &str) -> Result<BgmvKernels, String> {
    BgmvKernels::from_name(name).ok_or_else(|| {
        let names: Vec<_> = BgmvKernels::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown BGMV kernel set {name:?}; one of {}",
            names.join(", ")
        )
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("medley-lora-check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<bool> {
    let device = cli.device.open(0)?;
    // Decode (BGMV) rows go through the chosen CUDA kernel sets (all by default); the CPU has
    // one.
    let variants: &[BgmvKernels] = if device.is_cpu() {
        &[BgmvKernels::PerRow]
    } else if cli.bgmv.is_empty() {
        &BgmvKernels::ALL
    } else {
        &cli.bgmv
    };
    let default = BgmvKernels::current();
    let mut all_ok = lora_checks(&device, &cli.device, variants)?;
    set_bgmv_kernels(default);
    if !cli.lora_only {
        all_ok &= attention_checks(&device)?;
    }
    if cli.bench {
        bandwidth_table(&device, variants, cli.iters)?;
        set_bgmv_kernels(default);
        if !cli.lora_only {
            op_cost_table(&device, cli.iters)?;
        }
    }
    println!("\nresult: {}", if all_ok { "pass" } else { "FAIL" });
    Ok(all_ok)
}

/// The LoRA cases against the reference, BGMV ones through each of `variants`. Returns whether
/// every case passed.
fn lora_checks(
    device: &candle_core::Device,
    spec: &DeviceSpec,
    variants: &[BgmvKernels],
) -> anyhow::Result<bool> {
    let sets: Vec<_> = variants.iter().map(|v| v.name()).collect();
    println!(
        "## LoRA kernels vs the reference ({spec}; BGMV kernels: {})\n",
        sets.join(", ")
    );
    println!("| case | rows | in → out | rel. error | bound | unmapped rows changed | |");
    println!("|---|---:|---|---:|---:|---:|---|");
    let mut all_ok = true;
    for (k, case) in cases::cases(device).into_iter().enumerate() {
        // Segments go through the SGMV kernels, and through the fused BGMV kernels too when
        // they take them (short mappings, one row at a time).
        let kernels: Vec<BgmvKernels> = match case.mapping {
            KernelRows::PerRow(_) => variants.to_vec(),
            KernelRows::Segments(_) => variants
                .iter()
                .copied()
                .filter(|&v| {
                    v == BgmvKernels::PerRow || (v.is_fused() && case.rows <= FUSED_SEGMENT_ROWS)
                })
                .collect(),
        };
        for v in kernels {
            set_bgmv_kernels(v);
            let o = cases::run(&case, device, 100 + k as u64)?;
            all_ok &= o.passed();
            let label = match v {
                BgmvKernels::PerRow => String::new(),
                other => format!(" ({})", other.name()),
            };
            println!(
                "| {}{label} | {} | {} → {} | {:.2e} | {:.0e} | {} | {} |",
                case.name,
                case.rows,
                case.in_features,
                case.out_features(),
                o.rel_err,
                o.tolerance,
                o.unmapped_changed,
                if o.passed() { "ok" } else { "**FAIL**" }
            );
        }
    }
    Ok(all_ok)
}

/// The LoRA op's bandwidth at decode shapes, through each of `variants`, against a
/// device-to-device copy.
fn bandwidth_table(
    device: &candle_core::Device,
    variants: &[BgmvKernels],
    iters: usize,
) -> anyhow::Result<()> {
    let copy = bench::copy_gbps(device, 1024, iters.clamp(5, 20))?;
    println!("\n## LoRA bandwidth at decode (device-to-device copy: {copy:.0} GB/s)\n");
    println!(
        "Host-paced: a loop of calls, as an eager forward issues them. GPU: the calls queued \
         behind a stream-holding kernel and timed by events (the GPU's time alone). Uploads: \
         device tables uploaded during the GPU-timed calls.\n"
    );
    println!(
        "| kernels | dtype | projection | rows | adapters × rank | host-paced µs/call | GB/s \
         | of copy | GPU µs/call | GB/s | of copy | uploads |"
    );
    println!("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::BF16, DType::F32]
    };
    for &kernels in variants {
        set_bgmv_kernels(kernels);
        for &dtype in dtypes {
            for (rows, adapters, rank) in [(32, 8, 16), (32, 8, 64), (1, 1, 16)] {
                for r in bench::lora_rows(device, dtype, rows, adapters, rank, iters)? {
                    let share = |gbps: f64| format!("{:.0}%", 100.0 * gbps / copy);
                    let gpu = match (r.gpu_micros, r.gpu_gbps()) {
                        (Some(us), Some(g)) => format!("{us:.1} | {g:.0} | {}", share(g)),
                        _ => "- | - | -".into(),
                    };
                    println!(
                        "| {} | {dtype:?} | {} | {} | {} × {} | {:.1} | {:.0} | {} | {gpu} | {} |",
                        kernels.name(),
                        r.name,
                        r.rows,
                        r.adapters,
                        r.rank,
                        r.micros,
                        r.gbps(),
                        share(r.gbps()),
                        r.uploads,
                    );
                }
            }
        }
    }
    Ok(())
}

/// What a decode step's candle ops cost: host-paced against GPU time.
fn op_cost_table(device: &candle_core::Device, iters: usize) -> anyhow::Result<()> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    println!("\n## Decode-step ops, host-paced vs GPU time ({dtype:?})\n");
    println!(
        "A decode step issues about 17 such ops per layer. Host-paced far above GPU time: the \
         step is bound by the host issuing them.\n"
    );
    println!("| op | rows | host-paced µs/call | GPU µs/call |");
    println!("|---|---:|---:|---:|");
    for rows in [1, 32] {
        for c in bench::op_costs(device, dtype, rows, iters)? {
            let gpu = c.gpu_micros.map_or("-".into(), |us| format!("{us:.1}"));
            println!("| {} | {} | {:.1} | {gpu} |", c.name, c.rows, c.micros);
        }
    }
    Ok(())
}

/// The paged attention, fused and greedy kernels against their references (CUDA only; the CPU
/// kernel is checked by the unit tests). Returns whether every case passed.
fn attention_checks(device: &candle_core::Device) -> anyhow::Result<bool> {
    if device.is_cpu() {
        println!("\npaged attention: CUDA kernels only (the CPU kernel has its unit tests)");
        return Ok(true);
    }
    #[cfg(feature = "cuda")]
    {
        println!("\n## Paged attention, fused and greedy kernels vs the reference\n");
        println!("| case | rows | rel. error | bound | |");
        println!("|---|---:|---:|---:|---|");
        let mut ok = true;
        let mut cases = medley_shard::model::check_paged_attention(device)?;
        cases.extend(medley_shard::model::check_fused_ops(device)?);
        cases.extend(medley_shard::model::check_rope_kv_write(device)?);
        cases.extend(medley_shard::model::check_greedy(device)?);
        for c in cases {
            ok &= c.passed();
            println!(
                "| {} | {} | {:.2e} | {:.0e} | {} |",
                c.name,
                c.rows,
                c.rel_err,
                c.tolerance,
                if c.passed() { "ok" } else { "**FAIL**" }
            );
        }
        Ok(ok)
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("paged attention on {device:?}: built without the cuda feature")
}
