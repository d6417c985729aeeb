//! The router's warm-up call: the worst-case step run once before serving.

use super::memory::{BudgetFit, fit_budget, headroom};
use super::schedule::StepBudget;
use super::{Engine, EngineError, KvSizing, WarmupParams, WarmupResult};
use crate::model::{ForwardBatch, SeqChunk};

impl Engine {
    /// Sets the per-step prompt-token budget to the router's prefill budget and runs that
    /// worst-case step (split into requests of at most `max_input_tokens`) to check the model
    /// runs, then frees it. With [`KvSizing::GpuMemory`] the KV cache is then sized from what
    /// the step left of the GPU's memory (see the `kv_fit` module); otherwise the step
    /// is cut to what the KV pool holds. Last, the adapter budget is fitted to the GPU's
    /// memory. Returns the KV capacity.
    pub fn warmup(&mut self, req: &WarmupParams) -> Result<WarmupResult, EngineError> {
        self.step_prompt_tokens =
            StepBudget::new(req.max_prefill_tokens, req.max_idle_prefill_tokens);
        self.reset_graphs(req.max_total_tokens as usize)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        match self.kv_sizing {
            KvSizing::GpuMemory { utilization } if self.kv_can_be_fitted() => {
                self.warmup_fitting_kv(req, utilization)?
            }
            _ => {
                let chunks = self.warmup_chunks(req, self.kv.available_blocks());
                self.run_warmup_step(chunks)?
            }
        }
        self.fit_adapter_budget()?;
        Ok(WarmupResult {
            max_supported_total_tokens: self.kv.capacity_tokens() as u64,
        })
    }

    /// The largest step, one in which no sequence decodes: the idle prefill budget in requests
    /// of at most `max_input_tokens`, within `blocks` KV blocks.
    pub(super) fn warmup_chunks(&self, req: &WarmupParams, blocks: usize) -> Vec<SeqChunk> {
        let per_req = (req.max_input_tokens as usize).clamp(1, self.max_positions() - 1);
        let mut remaining = self.step_prompt_tokens.idle as usize;
        let mut blocks_left = blocks;
        let mut chunks = vec![];
        let mut id = u64::MAX;
        while remaining > 0 && blocks_left > 0 {
            let n = remaining
                .min(per_req)
                .min(blocks_left.saturating_mul(self.kv.block_tokens()));
            blocks_left -= n.div_ceil(self.kv.block_tokens());
            let tokens = (0..n).map(|i| (i % self.vocab()) as u32).collect();
            chunks.push(SeqChunk {
                seq_id: id,
                tokens,
                start_pos: 0,
                adapter_slot: 0,
                all_logits: false,
            });
            remaining -= n;
            id -= 1;
        }
        chunks
    }

    /// Runs `chunks` as one prefill step and frees their KV blocks.
    pub(super) fn run_warmup_step(&mut self, chunks: Vec<SeqChunk>) -> Result<(), EngineError> {
        let ids: Vec<u64> = chunks.iter().map(|c| c.seq_id).collect();
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let result = (|| {
            for c in &chunks {
                self.kv
                    .allocate(c.seq_id, c.tokens.len())
                    .map_err(|e| EngineError::KvCache(e.to_string()))?;
            }
            self.model
                .forward(&ForwardBatch { chunks }, &mut self.kv, &self.adapters)
                .map_err(|e| {
                    EngineError::Model(format!("warm-up step of {tokens} prompt tokens: {e}"))
                })
        })();
        for id in ids {
            self.kv.free(id);
        }
        result.map(|_| ())
    }

    /// Caps the adapter budget to the GPU memory left after the warm-up step (see
    /// [`memory`](super::memory)); nothing on the CPU.
    fn fit_adapter_budget(&mut self) -> Result<(), EngineError> {
        let Some(measured) = crate::device::memory_info(self.model.device()) else {
            return Ok(());
        };
        let mem = match measured {
            Ok(mem) => mem,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the GPU's free memory: the adapter budget stays as set");
                return Ok(());
            }
        };
        let budget = self.adapters.budget();
        match fit_budget(
            budget,
            self.adapters.max_slots(),
            mem,
            self.info.device_ranks,
        ) {
            Ok(BudgetFit::Fits) => {
                tracing::info!(
                    free_mib = mem.free >> 20,
                    total_mib = mem.total >> 20,
                    adapter_budget_mib = budget >> 20,
                    "GPU memory after the warm-up step"
                );
                Ok(())
            }
            Ok(BudgetFit::Capped(bytes)) => {
                tracing::warn!(
                    free_mib = mem.free >> 20,
                    total_mib = mem.total >> 20,
                    headroom_mib = headroom(mem.total) >> 20,
                    requested_mib = budget >> 20,
                    adapter_budget_mib = bytes >> 20,
                    "the adapter memory budget does not fit the GPU's free memory: capped"
                );
                self.adapters.set_budget(bytes);
                Ok(())
            }
            Err(e) => Err(EngineError::Model(e)),
        }
    }
}
