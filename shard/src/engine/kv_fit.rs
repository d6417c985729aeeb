//! Sizing the KV cache from the GPU's memory at the warm-up ([`KvSizing::GpuMemory`]), as vLLM
//! and TGI do: run the largest step with a cache just large enough for it, measure what the
//! step allocated beyond it (the memory pool's peak), drop that cache, hand the pool's idle
//! memory back to the driver, read what the shard holds (its weights) and what is free, and give
//! the KV cache what is left of the shard's budget (`--gpu-memory-utilization` of the GPU) and
//! of the free memory ([`fit_kv`]).
//!
//! Ranks of a tensor-parallel group agree on the smallest cache (their block schedules must
//! match step for step), and ranks sharing a device measure it together: every rank has
//! trimmed before any reads the free memory, and every rank has read it before any allocates.
//!
//! [`KvSizing::GpuMemory`]: super::KvSizing::GpuMemory

use candle_core::Device;

use super::memory::{KvFit, KvFitInput, fit_kv, headroom};
use super::{Engine, EngineError, WarmupParams};
use crate::comm::Comm;
use crate::device;
use crate::kv_cache::{KvCache, KvCacheConfig};

impl Engine {
    /// Whether the warm-up may size the KV cache from the device's memory: on a GPU, with no
    /// sequence holding blocks (a router reconnecting to live shards warms them up again).
    pub(super) fn kv_can_be_fitted(&self) -> bool {
        matches!(self.model.device(), Device::Cuda(_)) && self.kv.num_sequences() == 0
    }

    /// The warm-up of `KvSizing::GpuMemory`: the worst-case step on a cache of its size, then
    /// the cache sized from the memory left (see the module doc).
    pub(super) fn warmup_fitting_kv(
        &mut self,
        req: &WarmupParams,
        utilization: f64,
    ) -> Result<(), EngineError> {
        let device = self.model.device().clone();
        let chunks = self.warmup_chunks(req, usize::MAX);
        let block = self.kv.block_tokens();
        let step_blocks: usize = chunks.iter().map(|c| c.tokens.len().div_ceil(block)).sum();
        self.replace_kv(step_blocks.max(1))?;
        synchronize(&device)?;
        gpu(device::reset_pool_peak(&device))?;
        let before = gpu(device::pool_usage(&device))?.used;
        if before == 0 {
            // The step's cache is allocated, so candle allocates outside the pool (a device
            // without stream-ordered allocation): the step's peak and the weights read as 0,
            // and only the free memory and its headroom bound the cache.
            tracing::warn!(
                "the GPU's memory pool is not in use: the warm-up step's peak cannot be measured"
            );
        }
        self.run_warmup_step(chunks)?;
        synchronize(&device)?;
        let step_peak = gpu(device::pool_usage(&device))?
            .peak
            .saturating_sub(before);

        self.replace_kv(1)?;
        synchronize(&device)?;
        gpu(device::trim_pool(&device))?;
        let own = gpu(device::pool_usage(&device))?.used;
        let comm = self.comm();
        group(comm.barrier())?;
        let memory = gpu(device::memory_info(&device))?;
        let input = KvFitInput {
            memory,
            own,
            step_peak,
            adapter_budget: match self.adapters.max_slots() {
                0 => 0,
                _ => self.adapters.budget(),
            },
            utilization,
            device_ranks: self.info.device_ranks,
            block_bytes: (KvCache::bytes_per_token(self.model.kv_config(), self.model.dtype())
                * block) as u64,
        };
        let fit = fit_kv(&input);
        let blocks = smallest_over_ranks(comm.as_ref(), fit.blocks)?;
        let tokens = blocks.saturating_mul(block as u64);
        if tokens < u64::from(req.max_total_tokens.max(1)) {
            let step = self.step_prompt_tokens.idle;
            return Err(EngineError::Model(too_small(
                &input, &fit, tokens, step, req,
            )));
        }
        // The one-block cache is all the old one left: no need to free it first.
        self.kv = self.new_kv(usize::try_from(blocks).unwrap_or(usize::MAX))?;
        synchronize(&device)?;
        group(comm.barrier())?;
        tracing::info!(
            kv_cache_tokens = self.kv.capacity_tokens(),
            kv_cache_mib = (blocks * input.block_bytes) >> 20,
            free_mib = memory.free >> 20,
            total_mib = memory.total >> 20,
            budget_mib = fit.budget >> 20,
            weights_mib = own >> 20,
            step_peak_mib = step_peak >> 20,
            adapter_budget_mib = input.adapter_budget >> 20,
            utilization,
            by_free_memory = fit.by_free_memory,
            "KV cache sized from the GPU's memory"
        );
        Ok(())
    }

    /// Replaces the KV cache by one of `blocks` blocks, the old one freed first (a one-block
    /// cache takes its place) so that the two never hold device memory together.
    fn replace_kv(&mut self, blocks: usize) -> Result<(), EngineError> {
        self.kv = self.new_kv(1)?;
        if blocks > 1 {
            self.kv = self.new_kv(blocks)?;
        }
        Ok(())
    }

    /// A KV cache of `blocks` blocks, with the current one's block size and prefix caching.
    fn new_kv(&self, blocks: usize) -> Result<KvCache, EngineError> {
        let block_tokens = self.kv.block_tokens();
        let config = KvCacheConfig {
            capacity_tokens: blocks.saturating_mul(block_tokens),
            block_tokens,
            prefix_caching: self.kv.prefix_caching(),
        };
        KvCache::new(
            self.model.kv_config(),
            self.model.dtype(),
            self.model.device(),
            config,
        )
        .map_err(|e| EngineError::Model(format!("allocating a KV cache of {blocks} blocks: {e}")))
    }
}

/// The smallest of every rank's `blocks`.
fn smallest_over_ranks(comm: &dyn Comm, blocks: u64) -> Result<u64, EngineError> {
    if comm.world_size() == 1 {
        return Ok(blocks);
    }
    // Block counts as f32: exact below 2^24, and every rank reads the same values either way.
    let mut all = vec![0f32; comm.world_size()];
    group(comm.all_gather(&[blocks as f32], &mut all))?;
    Ok(all.iter().fold(blocks, |m, &b| m.min(b as u64)))
}

/// Why the memory left holds less than one request, with the numbers and what to change.
fn too_small(
    input: &KvFitInput,
    fit: &KvFit,
    tokens: u64,
    step_tokens: u32,
    req: &WarmupParams,
) -> String {
    let total = input.memory.total;
    let ranks = match input.device_ranks {
        0 | 1 => String::new(),
        n => format!(" (for each of the {n} ranks on it)"),
    };
    format!(
        "the KV cache sized from the GPU's memory holds {tokens} tokens, less than one request \
         of --max-total-tokens {}: the shard may use {} MiB{ranks} of the GPU's {} MiB \
         (--gpu-memory-utilization {}), of which its weights take {} MiB, the warm-up step of \
         {} prompt tokens {} MiB and the adapters {} MiB; {} MiB{ranks} are free, {} MiB of it \
         kept free; lower the largest step (--max-batch-prefill-tokens), --max-total-tokens or \
         --adapter-memory-budget, raise --gpu-memory-utilization{}, use more shards \
         (--num-shard) or --quantize, or set --kv-cache-tokens",
        req.max_total_tokens,
        fit.budget >> 20,
        total >> 20,
        input.utilization,
        input.own >> 20,
        step_tokens,
        input.step_peak >> 20,
        input.adapter_budget >> 20,
        fit.share >> 20,
        headroom(total) >> 20,
        if fit.by_free_memory {
            " (the free memory ran out before the budget: it would not help)"
        } else {
            ""
        },
    )
}

fn synchronize(device: &Device) -> Result<(), EngineError> {
    device
        .synchronize()
        .map_err(|e| EngineError::Model(format!("waiting for the device: {e}")))
}

/// A GPU memory reading (`None` only on the CPU, where this never runs).
fn gpu<T>(reading: Option<Result<T, String>>) -> Result<T, EngineError> {
    match reading {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(EngineError::Model(format!("reading the GPU's memory: {e}"))),
        None => Err(EngineError::Model(
            "the KV cache is sized from GPU memory only on a GPU".into(),
        )),
    }
}

fn group<T>(result: Result<T, crate::comm::CommError>) -> Result<T, EngineError> {
    result.map_err(|e| EngineError::GroupBroken(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{Single, on_ranks};
    use crate::device::DeviceMemory;

    #[test]
    fn every_rank_takes_the_smallest_cache_of_the_group() {
        let sizes = [900u64, 700, 1_000_000, 800];
        let agreed = on_ranks(sizes.len(), 64, move |comm| {
            smallest_over_ranks(&comm, sizes[comm.rank()]).expect("gather")
        });
        assert_eq!(agreed, vec![700; 4]);
        assert_eq!(smallest_over_ranks(&Single, 123).expect("alone"), 123);
    }

    #[test]
    fn no_room_for_one_request_says_what_took_the_memory_and_what_to_change() {
        const MIB: u64 = 1 << 20;
        let input = KvFitInput {
            memory: DeviceMemory {
                free: 1381 * MIB,
                total: 1800 * MIB,
            },
            own: 400 * MIB,
            step_peak: 98 * MIB,
            adapter_budget: 1024 * MIB,
            utilization: 0.9,
            device_ranks: 2,
            block_bytes: MIB,
        };
        let fit = fit_kv(&input);
        let req = WarmupParams {
            max_input_tokens: 1024,
            max_prefill_tokens: 2048,
            max_idle_prefill_tokens: 2048,
            max_total_tokens: 2048,
        };
        let text = too_small(&input, &fit, 0, 2048, &req);
        for part in [
            "holds 0 tokens, less than one request of --max-total-tokens 2048",
            "the shard may use 810 MiB (for each of the 2 ranks on it) of the GPU's 1800 MiB \
             (--gpu-memory-utilization 0.9), of which its weights take 400 MiB, the warm-up \
             step of 2048 prompt tokens 98 MiB and the adapters 1024 MiB; 690 MiB (for each of \
             the 2 ranks on it) are free, 256 MiB of it kept free",
            "raise --gpu-memory-utilization, use more shards",
            "or set --kv-cache-tokens",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
    }
}
