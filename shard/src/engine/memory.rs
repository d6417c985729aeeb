//! The shard's budgets against the GPU's memory, decided at the warm-up (the largest step the
//! router will send, whose activations the device's memory pool keeps for reuse).
//!
//! - The KV cache, unless its size is set (`--kv-cache-tokens`, `--kv-cache-bytes`), takes what
//!   is left of this shard's share of the GPU ([`fit_kv`]): `--gpu-memory-utilization` of the
//!   device (0.9 by default) is what the shard may use, as vLLM's flag means it (per instance:
//!   two servers at 0.45 share a GPU), less its weights, the warm-up step's activations and the
//!   adapter budget; and never more than is free, less a headroom.
//! - The adapter slots may take what is free after that less some headroom ([`fit_budget`]). A
//!   budget above that (1 GiB by default, or `--adapter-memory-budget`) would only turn into
//!   out-of-memory failures of whole batches once enough adapters are resident; capped, the
//!   router evicts idle adapters to stay within it instead.

use crate::device::DeviceMemory;

/// Device memory kept free beyond the warm-up's peak, for what the warm-up step does not
/// allocate: the LoRA products' intermediates and tables, a decode step's logits over more rows
/// than the warm-up computed, cuBLAS's workspaces. 2% of the device, at least 256 MiB.
pub(crate) fn headroom(total: u64) -> u64 {
    (total / 50).max(256 << 20)
}

/// Fewest bytes the adapter budget may be capped to while the shard has adapter slots: below
/// this no adapter of a real model fits, and starting would only fail every adapter request.
pub(crate) const MIN_ADAPTER_BUDGET: u64 = 16 << 20;

/// What [`fit_budget`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BudgetFit {
    /// The budget fits as it is.
    Fits,
    /// The budget is capped to this many bytes.
    Capped(u64),
}

/// Fits the adapter budget `budget` of a shard with `slots` adapter slots to `memory`, measured
/// after the warm-up step, of which the shard may take its share among the `device_ranks` ranks
/// on the device. Errors (with the numbers) when slots exist but less than
/// [`MIN_ADAPTER_BUDGET`] is left for them.
pub(crate) fn fit_budget(
    budget: u64,
    slots: u32,
    memory: DeviceMemory,
    device_ranks: u32,
) -> Result<BudgetFit, String> {
    let reserve = headroom(memory.total);
    let share = memory.free / u64::from(device_ranks.max(1));
    let available = share.saturating_sub(reserve);
    if slots == 0 || budget <= available {
        return Ok(BudgetFit::Fits);
    }
    if available < MIN_ADAPTER_BUDGET {
        return Err(format!(
            "after the weights, the KV cache and the warm-up step, {} MiB of the GPU's {} MiB are \
             free{}: less than the {} MiB of headroom serving keeps plus the {} MiB adapters \
             need at least; lower the KV cache (--kv-cache-tokens) or the largest step \
             (--max-batch-prefill-tokens, --max-idle-prefill-tokens), use more shards \
             (--num-shard) or --quantize, or serve without adapters (--max-adapter-slots 0)",
            memory.free >> 20,
            memory.total >> 20,
            match device_ranks {
                0 | 1 => String::new(),
                n => format!(" ({} MiB for each of the {n} ranks on it)", share >> 20),
            },
            reserve >> 20,
            MIN_ADAPTER_BUDGET >> 20,
        ));
    }
    Ok(BudgetFit::Capped(available))
}

/// Default `--gpu-memory-utilization`: the share of the GPU's memory a shard may fill (weights,
/// KV cache, activations, adapters), as vLLM's default.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// What [`fit_kv`] sizes the KV cache from, measured after the warm-up step with the step's
/// cache dropped and the memory pool trimmed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KvFitInput {
    /// The device's memory (what every process on it holds is used).
    pub memory: DeviceMemory,
    /// What this shard holds of the device's memory pool: its weights.
    pub own: u64,
    /// The most the warm-up step had allocated at once beyond its KV cache: the activations
    /// every later step of at most that size finds again in the pool.
    pub step_peak: u64,
    /// The adapter budget to leave room for (0 without adapter slots).
    pub adapter_budget: u64,
    /// `--gpu-memory-utilization`.
    pub utilization: f64,
    /// Ranks sharing the device (`cuda:N:shared`); each sizes its own cache from its share.
    pub device_ranks: u32,
    /// Bytes of one KV block.
    pub block_bytes: u64,
}

/// What [`fit_kv`] decided, in bytes of this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KvFit {
    /// Blocks of the KV cache (0 when nothing is left for it).
    pub blocks: u64,
    /// What this rank may use: its share of `utilization` of the device.
    pub budget: u64,
    /// This rank's share of the free memory.
    pub share: u64,
    /// Whether the free memory (other processes on the GPU), not the budget, set the size.
    pub by_free_memory: bool,
}

/// Sizes the KV cache: the smaller of the rank's budget less what it holds (weights, the
/// warm-up step's peak, the adapter budget) and its share of the free memory less the step's
/// peak, the adapter budget and the [`headroom`], in whole blocks.
pub(crate) fn fit_kv(input: &KvFitInput) -> KvFit {
    let ranks = u64::from(input.device_ranks.max(1));
    let total = input.memory.total;
    let budget = (input.utilization.clamp(0.0, 1.0) * total as f64).round() as u64 / ranks;
    let share = input.memory.free / ranks;
    let needs = input.step_peak.saturating_add(input.adapter_budget);
    let by_budget = budget.saturating_sub(input.own).saturating_sub(needs);
    let by_free = share.saturating_sub(needs).saturating_sub(headroom(total));
    KvFit {
        blocks: by_budget.min(by_free) / input.block_bytes.max(1),
        budget,
        share,
        by_free_memory: by_free < by_budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn memory(free: u64, total: u64) -> DeviceMemory {
        DeviceMemory { free, total }
    }

    #[test]
    fn a_budget_that_fits_is_kept() {
        // An H100 with a 16 GiB model and a 2 GiB KV cache: 1 GiB of adapters fits easily.
        assert_eq!(
            fit_budget(GIB, 64, memory(60 * GIB, 80 * GIB), 1),
            Ok(BudgetFit::Fits)
        );
        // Exactly free less the headroom (2% of 80 GiB) fits too.
        let total = 80 * GIB;
        let free = GIB + headroom(total);
        assert_eq!(
            fit_budget(GIB, 64, memory(free, total), 1),
            Ok(BudgetFit::Fits)
        );
    }

    #[test]
    fn a_budget_past_free_memory_is_capped() {
        // 1 GiB total, 700 MiB free: 256 MiB of headroom leaves 444 MiB for adapters.
        assert_eq!(
            fit_budget(GIB, 64, memory(700 * MIB, GIB), 1),
            Ok(BudgetFit::Capped(444 * MIB))
        );
        // Two ranks on the device (cuda:0:shared) share what is free: 350 MiB each, 94 MiB of
        // it for adapters.
        assert_eq!(
            fit_budget(GIB, 64, memory(700 * MIB, GIB), 2),
            Ok(BudgetFit::Capped(94 * MIB))
        );
        // The headroom grows with the device: 2% of 80 GiB.
        assert_eq!(headroom(80 * GIB), 80 * GIB / 50);
        assert_eq!(headroom(GIB), 256 * MIB);
    }

    #[test]
    fn too_little_memory_for_adapters_is_an_error_unless_there_are_no_slots() {
        let tight = memory(260 * MIB, 8 * GIB);
        let e = fit_budget(GIB, 64, tight, 1).expect_err("4 MiB left");
        assert!(e.contains("260 MiB of the GPU's 8192 MiB are free:"), "{e}");
        assert!(e.contains("--max-adapter-slots 0"), "{e}");
        assert_eq!(fit_budget(GIB, 0, tight, 1), Ok(BudgetFit::Fits));
        let e = fit_budget(GIB, 64, memory(400 * MIB, 8 * GIB), 2).expect_err("200 MiB each");
        assert!(e.contains("(200 MiB for each of the 2 ranks on it)"), "{e}");
    }

    fn kv_input(free: u64, total: u64) -> KvFitInput {
        KvFitInput {
            memory: memory(free, total),
            own: 0,
            step_peak: 0,
            adapter_budget: 0,
            utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            device_ranks: 1,
            block_bytes: MIB,
        }
    }

    #[test]
    fn the_kv_cache_takes_the_budget_less_weights_step_and_adapters() {
        // An 80 GiB GPU, 16 GiB of weights (64 GiB free), a 2 GiB step, 1 GiB of adapters: the
        // shard may use 72 GiB (0.9), so the cache gets 72 - 16 - 2 - 1 = 53 GiB of 1 MiB blocks.
        let input = KvFitInput {
            own: 16 * GIB,
            step_peak: 2 * GIB,
            adapter_budget: GIB,
            ..kv_input(64 * GIB, 80 * GIB)
        };
        let fit = fit_kv(&input);
        assert_eq!((fit.budget, fit.share), (72 * GIB, 64 * GIB));
        assert_eq!(fit.blocks, 53 * 1024);
        assert!(!fit.by_free_memory);
        // Partial blocks are left out.
        let fit = fit_kv(&KvFitInput {
            block_bytes: 3 * MIB,
            ..input
        });
        assert_eq!(fit.blocks, (53 * GIB / MIB) / 3);
    }

    #[test]
    fn two_servers_at_half_utilization_share_a_gpu() {
        // Each holds 10 GiB of weights and may use 40 GiB: 29 GiB of cache (1 GiB of step).
        let total = 80 * GIB;
        let first = fit_kv(&KvFitInput {
            own: 10 * GIB,
            step_peak: GIB,
            utilization: 0.5,
            ..kv_input(70 * GIB, total)
        });
        assert_eq!(first.blocks, 29 * 1024);
        // The second starts with the first's 40 GiB and its own weights taken: 30 GiB free, of
        // which the headroom stays free, so it gets a little less than its budget, not nothing.
        let second = fit_kv(&KvFitInput {
            own: 10 * GIB,
            step_peak: GIB,
            utilization: 0.5,
            ..kv_input(30 * GIB, total)
        });
        assert!(second.by_free_memory);
        assert_eq!(second.blocks, (29 * GIB - headroom(total)) / MIB);
    }

    #[test]
    fn other_processes_leave_less_free_and_the_free_memory_decides() {
        // 0.9 of 80 GiB is 72 GiB, but another process holds 50 GiB: of the 14 GiB free after
        // 16 GiB of weights, the step (2 GiB) and the headroom (2% of the device) stay out.
        let total = 80 * GIB;
        let fit = fit_kv(&KvFitInput {
            own: 16 * GIB,
            step_peak: 2 * GIB,
            ..kv_input(14 * GIB, total)
        });
        assert!(fit.by_free_memory);
        assert_eq!(fit.blocks, (12 * GIB - headroom(total)) / MIB);
        // At 1.0 the headroom still stays free.
        let all = fit_kv(&KvFitInput {
            utilization: 1.0,
            ..kv_input(64 * GIB, total)
        });
        assert_eq!(all.blocks, (64 * GIB - headroom(total)) / MIB);
    }

    #[test]
    fn ranks_sharing_a_device_split_its_budget_and_free_memory() {
        // cuda:0:shared with 2 ranks, 8 GiB of weights each (64 GiB free): each may use 36 GiB,
        // less its 8 GiB of weights and 1 GiB of step.
        let fit = fit_kv(&KvFitInput {
            own: 8 * GIB,
            step_peak: GIB,
            device_ranks: 2,
            ..kv_input(64 * GIB, 80 * GIB)
        });
        assert_eq!((fit.budget, fit.share), (36 * GIB, 32 * GIB));
        assert_eq!(fit.blocks, 27 * 1024);
    }

    #[test]
    fn nothing_left_is_zero_blocks_not_an_underflow() {
        let fit = fit_kv(&KvFitInput {
            own: 79 * GIB,
            step_peak: 2 * GIB,
            ..kv_input(GIB, 80 * GIB)
        });
        assert_eq!(fit.blocks, 0);
    }
}
