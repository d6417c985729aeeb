//! Bandwidth: the batched LoRA op at decode shapes against a device-to-device copy measured in
//! the same run (the memory system's practical peak).
//!
//! A decode step's LoRA work is memory-bound: every adapter's factors are read once (the rows
//! that share an adapter hit the cache), so achieved bandwidth = (factor bytes of the adapters
//! used + x, y and the intermediate) / time.
//!
//! Each call is timed two ways:
//! * **host-paced**: wall time of a loop of calls, as an eager forward pass issues them. For
//!   calls this small it is bound by the host's per-call work (launches, allocation, the table
//!   lookups), not by the GPU.
//! * **GPU** (CUDA only): nvbench's blocking-kernel method. A kernel holds the stream while the
//!   host queues every timed call behind it, then two events bracket the calls, which run back
//!   to back: the time the GPU spends on them, launch gaps between kernels included. A
//!   measurement whose queueing outlasted the hold would include host time; it is reported as
//!   missing instead.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use medley_kernels::NO_ADAPTER;
use medley_kernels::testing::values;
use medley_shard::adapters::lora_op::{KernelRows, LoraFactors, add_lora, cuda_table_uploads};

/// One measured shape.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Projection, e.g. `gate/up 4096→14336`.
    pub name: String,
    /// Rows (decode streams).
    pub rows: usize,
    /// Distinct adapters among the rows.
    pub adapters: usize,
    /// Rank of each adapter.
    pub rank: usize,
    /// Microseconds per call, host-paced.
    pub micros: f64,
    /// Microseconds per call on the GPU alone (`None` on the CPU, or when the host could not
    /// queue the calls within the hold).
    pub gpu_micros: Option<f64>,
    /// Device tables the op uploaded during the timed calls (0: every call reused its tables).
    pub uploads: u64,
    /// Bytes moved per call.
    pub bytes: f64,
}

impl BenchRow {
    /// Achieved bandwidth, host-paced, GB/s.
    pub fn gbps(&self) -> f64 {
        self.bytes / self.micros / 1e3
    }

    /// Achieved bandwidth on the GPU alone, GB/s.
    pub fn gpu_gbps(&self) -> Option<f64> {
        self.gpu_micros.map(|us| self.bytes / us / 1e3)
    }
}

fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

/// Seconds per iteration of `f`, after `warm` untimed ones.
fn time(
    device: &Device,
    warm: usize,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    sync(device)?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(device)?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

/// Seconds per call of `f` on the GPU alone, after [`time`] measured `host_secs` per call
/// (which sizes the hold); `None` on the CPU or when the queueing outlasted the hold.
fn gpu_time(
    device: &Device,
    iters: usize,
    host_secs: f64,
    f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // Four times the host-paced loop's time, at least 20 ms, at most 2 s.
        let hold = (4.0 * iters as f64 * host_secs).clamp(0.02, 2.0);
        return gpu_timer::time(dev, iters, hold, f);
    }
    let _ = (device, iters, host_secs, f);
    Ok(None)
}

/// Seconds per call of `f` both ways: host-paced after `warm` untimed calls, then on the GPU
/// alone (see [`gpu_time`]).
fn time_both(
    device: &Device,
    warm: usize,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<(f64, Option<f64>)> {
    let secs = time(device, warm, iters, &mut f)?;
    Ok((secs, gpu_time(device, iters, secs, f)?))
}

/// Device-to-device copy bandwidth in GB/s (read + write) over a `mib` MiB f32 buffer: GPU
/// time on a GPU, host-paced on the CPU.
pub fn copy_gbps(device: &Device, mib: usize, iters: usize) -> candle_core::Result<f64> {
    let n = mib * (1 << 20) / 4;
    let src = Tensor::zeros(n, DType::F32, device)?;
    let (secs, gpu_secs) = time_both(device, 2, iters, || src.copy().map(|_| ()))?;
    let secs = gpu_secs.unwrap_or(secs);
    Ok(2.0 * (n * 4) as f64 / secs / 1e9)
}

/// The LoRA op at `rows` decode rows spread over `adapters` adapters of `rank`, for the
/// projections of an 8B-class Llama (hidden 4096, intermediate 14336), in `dtype`.
pub fn lora_rows(
    device: &Device,
    dtype: DType,
    rows: usize,
    adapters: usize,
    rank: usize,
    iters: usize,
) -> candle_core::Result<Vec<BenchRow>> {
    let shapes = [
        ("q/o 4096→4096", 4096, 4096),
        ("gate/up 4096→14336", 4096, 14336),
        ("down 14336→4096", 14336, 4096),
    ];
    let mut out = Vec::new();
    for (name, inf, outf) in shapes {
        let dev_tensor = |n: usize, shape: (usize, usize), dt: DType, seed: u64| {
            Tensor::from_vec(values(n, seed), shape, &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(device)
        };
        let x = dev_tensor(rows * inf, (rows, inf), dtype, 1)?;
        let y = dev_tensor(rows * outf, (rows, outf), dtype, 2)?;
        let f: Vec<(Tensor, Tensor)> = (0..adapters)
            .map(|k| {
                Ok((
                    dev_tensor(rank * inf, (rank, inf), DType::F32, 10 + k as u64)?,
                    dev_tensor(rank * outf, (rank, outf), DType::F32, 20 + k as u64)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let factors: Vec<LoraFactors<'_>> = f
            .iter()
            .map(|(a, b_t)| LoraFactors { rank, a, b_t })
            .collect();
        let table: Vec<u32> = (0..rows as u32).map(|r| r % adapters as u32).collect();
        debug_assert!(!table.contains(&NO_ADAPTER));
        let mapping = KernelRows::PerRow(table);
        let mut call = || add_lora(&x, &y, &mapping, &factors);
        let secs = time(device, 3, iters, &mut call)?;
        // Counted around the GPU-timed calls only: the host-paced ones warmed the tables.
        let before = cuda_table_uploads();
        let gpu_secs = gpu_time(device, iters, secs, &mut call)?;
        let after = cuda_table_uploads();
        let act = dtype.size_in_bytes();
        let bytes = adapters * rank * (inf + outf) * 4 // factors, f32
            + rows * inf * act // x
            + 2 * rows * outf * act // y read and written
            + 2 * rows * rank * 4; // t written and read
        out.push(BenchRow {
            name: name.to_string(),
            rows,
            adapters,
            rank,
            micros: secs * 1e6,
            gpu_micros: gpu_secs.map(|s| s * 1e6),
            uploads: (after.0 - before.0) + (after.1 - before.1),
            bytes: bytes as f64,
        });
    }
    Ok(out)
}

/// The blocking-kernel timer (see the module docs).
#[cfg(feature = "cuda")]
mod gpu_timer {
    use std::time::Instant;

    use candle_core::CudaDevice;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg, sys};
    use medley_kernels::cuda::{SPIN_KERNEL, TIMING_PTX};

    /// Seconds per call of `f`, `iters` calls queued behind a `hold_secs` hold of the stream;
    /// `None` when queueing them took longer than the hold.
    pub fn time(
        dev: &CudaDevice,
        iters: usize,
        hold_secs: f64,
        mut f: impl FnMut() -> candle_core::Result<()>,
    ) -> candle_core::Result<Option<f64>> {
        let stream = dev.cuda_stream();
        let spin = dev.get_or_load_custom_func(SPIN_KERNEL, "medley_timing", TIMING_PTX)?;
        let ns = (hold_secs * 1e9) as u64;
        let mut launch = spin.builder();
        launch.arg(&ns);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let queued = Instant::now();
        // SAFETY: `medley_spin(uint64_t ns)` takes one u64 and touches no memory.
        unsafe { launch.launch(cfg) }.w()?;
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timed).w()?;
        for _ in 0..iters {
            f()?;
        }
        let end = stream.record_event(timed).w()?;
        let queueing = queued.elapsed().as_secs_f64();
        let ms = start.elapsed_ms(&end).w()?;
        if queueing >= hold_secs {
            return Ok(None);
        }
        Ok(Some(ms as f64 / 1e3 / iters as f64))
    }
}

/// One op of [`op_costs`], producing its output tensor.
type OpFn<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;

/// One candle op at a decode shape, timed both ways.
#[derive(Debug, Clone)]
pub struct OpCost {
    /// What was timed.
    pub name: &'static str,
    /// Rows (decode streams).
    pub rows: usize,
    /// Microseconds per call, host-paced.
    pub micros: f64,
    /// Microseconds per call on the GPU alone (`None` as for [`BenchRow::gpu_micros`]).
    pub gpu_micros: Option<f64>,
}

/// The cost of the ops a decode step is made of, at TinyLlama's widths (hidden 2048, MLP 5632)
/// in `dtype`: where host-paced time is far above GPU time, a step of such ops is bound by the
/// host issuing them, not by the GPU.
pub fn op_costs(
    device: &Device,
    dtype: DType,
    rows: usize,
    iters: usize,
) -> candle_core::Result<Vec<OpCost>> {
    use medley_shard::model::layers::{Linear, RmsNorm, silu_mul};
    let (hidden, inter) = (2048, 5632);
    let tensor = |n: usize, shape: (usize, usize), seed: u64| {
        Tensor::from_vec(values(n, seed), shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    };
    let x = tensor(rows * hidden, (rows, hidden), 1)?;
    let g = tensor(rows * inter, (rows, inter), 2)?;
    let u = tensor(rows * inter, (rows, inter), 3)?;
    let up = Linear::new(tensor(inter * hidden, (inter, hidden), 4)?, dtype)?;
    let down = Linear::new(tensor(hidden * inter, (hidden, inter), 5)?, dtype)?;
    let norm = RmsNorm::new(
        Tensor::ones(hidden, DType::F32, device)?.to_dtype(dtype)?,
        1e-5,
    )?;
    let tiny = tensor(rows, (rows, 1), 6)?;
    let ops: [(&str, OpFn<'_>); 6] = [
        (
            "copy of one value per row (the floor)",
            Box::new(|| tiny.copy()),
        ),
        ("add, hidden", Box::new(|| &x + &x)),
        ("RMSNorm, hidden", Box::new(|| norm.forward(&x))),
        ("SiLU·mul, MLP width", Box::new(|| silu_mul(&g, &u))),
        ("projection 2048→5632", Box::new(|| up.forward(&x))),
        ("projection 5632→2048", Box::new(|| down.forward(&g))),
    ];
    let mut out = Vec::new();
    for (name, op) in ops {
        let (secs, gpu_secs) = time_both(device, 3, iters, || op().map(|_| ()))?;
        out.push(OpCost {
            name,
            rows,
            micros: secs * 1e6,
            gpu_micros: gpu_secs.map(|s| s * 1e6),
        });
    }
    Ok(out)
}
