//! The adapter slots of a shard: which adapter each slot holds, byte accounting against the
//! memory budget, content hashes. Owned by the engine thread; the forward pass reads it through
//! [`crate::model::LoraDelta`] (see `delta.rs`).

use std::sync::Arc;

use super::AdapterError;
use super::weights::SlotAdapter;

/// How the LoRA products are computed (`--lora-backend`, `LORA_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoraBackend {
    /// `medley_kernels` SGMV/BGMV: the CPU kernels, or their CUDA versions on a GPU.
    #[default]
    Kernels,
    /// candle ops per slot group: `index_select`, two matmuls, `index_add`.
    Candle,
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// Bytes the slot holds now.
    pub bytes: u64,
    /// Rank of the adapter.
    pub rank: u32,
    /// Hex SHA-256 of the slot weights.
    pub content_hash: String,
    /// Content hash of the adapter the slot held before, if any.
    pub replaced: Option<String>,
}

/// One occupied slot, as [`AdapterStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSlotInfo {
    /// The slot (`>= 1`).
    pub slot: u32,
    /// Hex SHA-256 of the slot weights.
    pub content_hash: String,
    /// Bytes the slot holds.
    pub bytes: u64,
}

/// Slots `1..=max_slots` (slot 0 is the base model and holds nothing).
#[derive(Debug)]
pub struct AdapterStore {
    slots: Vec<Option<Arc<SlotAdapter>>>,
    budget: u64,
    used: u64,
    backend: LoraBackend,
}

impl AdapterStore {
    /// An empty store.
    pub fn new(max_slots: u32, budget: u64, backend: LoraBackend) -> Self {
        Self {
            slots: vec![None; max_slots as usize],
            budget,
            used: 0,
            backend,
        }
    }

    /// Number of slots.
    pub fn max_slots(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Sets the memory budget (the engine fits it to the device's free memory at warm-up, before
    /// any slot is filled).
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    /// Bytes held by all slots.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The compute path of [`crate::model::LoraDelta::apply`].
    pub fn backend(&self) -> LoraBackend {
        self.backend
    }

    /// Switches the compute path (benchmarks compare them).
    pub fn set_backend(&mut self, backend: LoraBackend) {
        self.backend = backend;
    }

    fn index(&self, slot: u32) -> Result<usize, AdapterError> {
        let max = self.max_slots();
        if slot == 0 || slot > max {
            return Err(AdapterError::BadSlot { slot, max });
        }
        Ok(slot as usize - 1)
    }

    /// The adapter in `slot` (None for slot 0, an empty slot or a slot out of range).
    pub fn get(&self, slot: u32) -> Option<&SlotAdapter> {
        let i = self.index(slot).ok()?;
        self.slots.get(i)?.as_deref()
    }

    /// Whether a request may use `slot`: the base model (0) or a loaded slot.
    pub fn check_usable(&self, slot: u32) -> Result<(), AdapterError> {
        if slot == 0 {
            return Ok(());
        }
        self.index(slot)?;
        match self.get(slot) {
            Some(_) => Ok(()),
            None => Err(AdapterError::EmptySlot { slot }),
        }
    }

    /// Puts `adapter` into `slot`, replacing what it held, if the budget allows (the replaced
    /// adapter's bytes count as free). The router plans the budget, so an adapter that does not
    /// fit is refused as a router bug ([`AdapterError::OverBudget`]). On error nothing changes;
    /// on success the slot switches to the new adapter in one assignment.
    pub fn install(
        &mut self,
        slot: u32,
        adapter: SlotAdapter,
    ) -> Result<InstallReport, AdapterError> {
        let i = self.index(slot)?;
        let needed = adapter.bytes();
        let old = self.slots[i].as_ref().map_or(0, |a| a.bytes());
        let free = self.budget.saturating_sub(self.used - old);
        if needed > free {
            return Err(AdapterError::OverBudget {
                slot,
                needed,
                free,
                budget: self.budget,
            });
        }
        let report = InstallReport {
            bytes: needed,
            rank: adapter.rank(),
            content_hash: adapter.content_hash().to_string(),
            replaced: self.slots[i].as_ref().map(|a| a.content_hash().to_string()),
        };
        self.slots[i] = Some(Arc::new(adapter));
        self.used = self.used - old + needed;
        Ok(report)
    }

    /// Empties `slot`; returns the bytes freed (0 when it was already empty).
    pub fn offload(&mut self, slot: u32) -> Result<u64, AdapterError> {
        let i = self.index(slot)?;
        let freed = self.slots[i].take().map_or(0, |a| a.bytes());
        self.used -= freed;
        Ok(freed)
    }

    /// Every occupied slot with its adapter, ascending.
    pub fn occupied(&self) -> impl Iterator<Item = (u32, &SlotAdapter)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_deref().map(|a| (i as u32 + 1, a)))
    }

    /// The occupied slots, ascending.
    pub fn list(&self) -> Vec<AdapterSlotInfo> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref().map(|a| AdapterSlotInfo {
                    slot: i as u32 + 1,
                    content_hash: a.content_hash().to_string(),
                    bytes: a.bytes(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use medley_merge::fixture::{AdapterFixture, LlamaShape};

    use super::*;
    use crate::adapters::base::BaseModules;
    use crate::adapters::base::tests::tiny_config;
    use crate::adapters::weights::SlotWeights;

    fn adapter(rank: usize, seed: u64) -> SlotAdapter {
        let base = BaseModules::from_config(&tiny_config());
        let fx = AdapterFixture::new(rank, seed)
            .adapter(&LlamaShape::tiny().module_shapes())
            .expect("fixture");
        SlotWeights::from_adapter(&fx, &base)
            .expect("weights")
            .to_device(&base, &Device::Cpu)
            .expect("upload")
    }

    #[test]
    fn slots_budget_and_offload() {
        let a = adapter(2, 1);
        let per = a.bytes();
        let mut store = AdapterStore::new(3, 2 * per + per / 2, LoraBackend::Kernels);
        assert_eq!(store.max_slots(), 3);
        assert!(store.check_usable(0).is_ok());
        assert!(matches!(
            store.check_usable(1),
            Err(AdapterError::EmptySlot { slot: 1 })
        ));
        for bad in [0, 4] {
            let e = store.install(bad, adapter(2, 1)).expect_err("bad slot");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(matches!(
                store.check_usable(4),
                Err(AdapterError::BadSlot { .. })
            ));
        }
        let r1 = store.install(1, adapter(2, 1)).expect("fits");
        assert_eq!((r1.bytes, r1.rank, r1.replaced.as_deref()), (per, 2, None));
        store.install(2, adapter(2, 2)).expect("fits");
        assert_eq!(store.used_bytes(), 2 * per);
        // A third adapter exceeds the budget: a router bug (INTERNAL) naming needed and free
        // bytes.
        let e = store.install(3, adapter(2, 3)).expect_err("over budget");
        assert_eq!(e.code(), tonic::Code::Internal);
        let msg = e.to_string();
        assert!(
            msg.contains(&per.to_string()) && msg.contains(&(per / 2).to_string()),
            "{msg}"
        );
        assert!(store.get(3).is_none());
        // Replacing a slot counts its old bytes as free.
        let r = store.install(2, adapter(2, 4)).expect("replace");
        assert_eq!(r.replaced.as_deref(), Some(adapter(2, 2).content_hash()));
        assert_eq!(store.used_bytes(), 2 * per);
        // Larger than the whole budget: the same refusal.
        let e = store.install(3, adapter(8, 5)).expect_err("too large");
        assert!(matches!(e, AdapterError::OverBudget { .. }), "{e}");
        assert_eq!(e.code(), tonic::Code::Internal);
        // Offload frees the bytes; then the third adapter fits.
        assert_eq!(store.offload(1).expect("offload"), per);
        assert_eq!(store.offload(1).expect("idempotent"), 0);
        assert_eq!(store.used_bytes(), per);
        store.install(3, adapter(2, 3)).expect("fits now");
        let listed: Vec<(u32, u64)> = store.list().iter().map(|s| (s.slot, s.bytes)).collect();
        assert_eq!(listed, vec![(2, per), (3, per)]);
        assert_eq!(store.list()[1].content_hash, adapter(2, 3).content_hash());
    }

    #[test]
    fn failed_install_keeps_the_old_adapter() {
        let small = adapter(2, 1);
        let per = small.bytes();
        let hash = small.content_hash().to_string();
        let mut store = AdapterStore::new(2, 3 * per, LoraBackend::Kernels);
        store.install(1, small).expect("fits");
        // Rank 8 is 4x the bytes: replacing slot 1 would need 4·per with 3·per free.
        let e = store.install(1, adapter(8, 2)).expect_err("over budget");
        assert!(matches!(e, AdapterError::OverBudget { .. }));
        store.install(2, adapter(2, 3)).expect("fits");
        // Rank 6 (3·per) fits the budget but not the 2·per that would be free.
        let e = store.install(1, adapter(6, 2)).expect_err("over budget");
        assert!(matches!(e, AdapterError::OverBudget { .. }), "{e}");
        assert_eq!(store.get(1).map(|a| a.content_hash()), Some(hash.as_str()));
        assert_eq!(store.used_bytes(), 2 * per);
    }
}
