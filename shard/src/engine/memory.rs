//! The adapter memory budget against the GPU's memory: after the warm-up step (the largest one
//! the router will send, whose activations the device's memory pool keeps for reuse), the
//! adapter slots may take what is free less some headroom. A budget above that (1 GiB by
//! default, or `--adapter-memory-budget`) would only turn into out-of-memory failures of whole
//! batches once enough adapters are resident; capped, the router evicts idle adapters to stay
//! within it instead.

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
}
