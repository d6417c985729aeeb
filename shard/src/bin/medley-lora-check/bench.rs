//! Bandwidth: the batched LoRA op at decode shapes against a device-to-device copy measured in
//! the same run (the memory system's practical peak).
//!
//! A decode step's LoRA work is memory-bound: every adapter's factors are read once (the rows
//! that share an adapter hit the cache), so achieved bandwidth = (factor bytes of the adapters
//! used + x, y and the intermediate) / time.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use medley_kernels::NO_ADAPTER;
use medley_kernels::testing::values;
use medley_shard::adapters::lora_op::{KernelRows, LoraFactors, add_lora};

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
    /// Microseconds per call.
    pub micros: f64,
    /// Bytes moved per call.
    pub bytes: f64,
}

impl BenchRow {
    /// Achieved bandwidth, GB/s.
    pub fn gbps(&self) -> f64 {
        self.bytes / self.micros / 1e3
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

/// Device-to-device copy bandwidth in GB/s (read + write) over a `mib` MiB f32 buffer.
pub fn copy_gbps(device: &Device, mib: usize, iters: usize) -> candle_core::Result<f64> {
    let n = mib * (1 << 20) / 4;
    let src = Tensor::zeros(n, DType::F32, device)?;
    let secs = time(device, 2, iters, || src.copy().map(|_| ()))?;
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
        let secs = time(device, 3, iters, || add_lora(&x, &y, &mapping, &factors))?;
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
            bytes: bytes as f64,
        });
    }
    Ok(out)
}
