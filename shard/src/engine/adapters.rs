//! Adapter slot commands of the engine: installing a finished adapter (prepared off this
//! thread), offloading, listing. Each runs between two forward steps, so a step sees a slot
//! either before or after the change, never half of it.

use super::{Engine, EngineError};
use crate::adapters::{AdapterError, AdapterSlotInfo, AdapterStore, InstallReport, SlotAdapter};

impl Engine {
    /// Requests of cached batches that use `slot`.
    fn slot_users(&self, slot: u32) -> usize {
        self.batches
            .values()
            .flat_map(|b| &b.seqs)
            .filter(|s| s.adapter_slot == slot)
            .count()
    }

    /// Fails when running requests use `slot` (their adapter must not change under them).
    fn check_idle(&self, slot: u32) -> Result<(), AdapterError> {
        match self.slot_users(slot) {
            0 => Ok(()),
            requests => Err(AdapterError::SlotInUse { slot, requests }),
        }
    }

    /// Puts `adapter` into `slot` (replacing an idle slot's adapter) within the memory budget.
    pub fn install_adapter(
        &mut self,
        slot: u32,
        adapter: SlotAdapter,
    ) -> Result<InstallReport, EngineError> {
        if slot != 0 && slot <= self.adapters.max_slots() {
            self.check_idle(slot)?;
        }
        let report = self.adapters.install(slot, adapter)?;
        tracing::info!(
            slot,
            bytes = report.bytes,
            rank = report.rank,
            hash = %report.content_hash,
            replaced = report.replaced.as_deref().unwrap_or("-"),
            used = self.adapters.used_bytes(),
            budget = self.adapters.budget(),
            "adapter installed"
        );
        Ok(report)
    }

    /// Empties an idle `slot`; returns the bytes freed (0 for an empty slot).
    pub fn offload_adapter(&mut self, slot: u32) -> Result<u64, EngineError> {
        if slot != 0 && slot <= self.adapters.max_slots() {
            self.check_idle(slot)?;
        }
        let freed = self.adapters.offload(slot)?;
        tracing::info!(
            slot,
            freed,
            used = self.adapters.used_bytes(),
            "adapter offloaded"
        );
        Ok(freed)
    }

    /// The occupied slots.
    pub fn list_adapters(&self) -> Vec<AdapterSlotInfo> {
        self.adapters.list()
    }

    /// The adapter slots (for tests and benchmarks).
    pub fn adapters(&self) -> &AdapterStore {
        &self.adapters
    }
}
