//! The engine: owns the model, the KV cache and the cached batches, and runs prefill and decode
//! steps. It is driven from a single thread (see [`EngineHandle`]) so device and collective calls
//! never interleave.

mod adapters;
mod ahead;
mod forward;
mod handle;
mod heap;
mod kv_fit;
mod memory;
mod sample;
mod schedule;
mod sequence;
mod step_logits;
mod text;
mod types;
mod warmup;

use std::collections::HashMap;
use std::time::Instant;

use rustc_hash::FxHashSet;

use crate::adapters::{AdapterError, AdapterStore};
use crate::kv_cache::{AdapterIdentity, KvCache};
use crate::model::LlamaModel;
use crate::model::error_text::Plain;

pub use handle::{EngineHandle, EngineThreadSettings};
pub use heap::keep_freed_memory;
pub use memory::DEFAULT_GPU_MEMORY_UTILIZATION;
use schedule::{StepBudget, StepPlan};
use sequence::{SeqLimits, Sequence};
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub use step_logits::choose_on_host;
use step_logits::read_logits;
pub use text::TextContext;
pub use types::KvSizing;
pub use types::{
    AdapterSlotInfo, Batch, CachedBatch, FinishReason, GeneratedText, Generation, Request,
    SamplingParams, ShardInfo, StepResponse, StepTimings, StopParams, Tokens, WarmupParams,
    WarmupResult,
};

/// Errors of the engine, mapped to gRPC statuses by the server.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The router sent something inconsistent (unknown ids, empty prompt, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A batch id the shard does not hold.
    #[error("unknown batch {0}")]
    UnknownBatch(u64),
    /// The KV cache cannot hold the batch.
    #[error("kv cache: {0}")]
    KvCache(String),
    /// The forward pass failed.
    #[error("model: {0}")]
    Model(String),
    /// Detokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An adapter slot operation failed, or a request uses an unusable slot.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The engine thread is gone.
    #[error("engine stopped")]
    Stopped,
    /// The tensor-parallel group failed (a rank died, or a collective timed out): only a
    /// restart of the whole group recovers.
    #[error("tensor-parallel group broken: {0}")]
    GroupBroken(String),
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::InvalidRequest(_) => tonic::Code::InvalidArgument,
            EngineError::UnknownBatch(_) => tonic::Code::NotFound,
            EngineError::KvCache(_) => tonic::Code::ResourceExhausted,
            EngineError::Model(_) | EngineError::Tokenizer(_) => tonic::Code::Internal,
            EngineError::Adapter(a) => a.code(),
            EngineError::Stopped | EngineError::GroupBroken(_) => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// The shard's identity, given when the engine is built (part of what `Info` reports, see
/// [`ShardInfo`]).
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Model name for logs and `/info`.
    pub model_id: String,
    /// This shard's rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Ranks of the group on this rank's device, this one included (the world size on
    /// `cuda:N:shared`, else 1): they share its free memory when the KV cache and the adapter
    /// budget are fitted to it at warm-up.
    pub device_ranks: u32,
}

/// A batch whose KV state lives here.
struct BatchState {
    seqs: Vec<Sequence>,
    /// What a step run ahead left for the batch's next call.
    ahead: Option<ahead::Ahead>,
}

/// Owns the model, the KV cache, the adapter slots and every cached batch.
pub struct Engine {
    model: LlamaModel,
    kv: KvCache,
    text: TextContext,
    info: EngineInfo,
    adapters: AdapterStore,
    batches: HashMap<u64, BatchState>,
    /// Prompt tokens one step may compute (chunked prefill), set by the router's warm-up.
    step_prompt_tokens: StepBudget,
    /// Arrival counter of sequences.
    arrivals: u64,
    /// The batch the last prefill or decode kept: the one [`Engine::decode_ahead`] may run.
    last_kept: Option<u64>,
    /// How the warm-up sizes the KV cache.
    kv_sizing: KvSizing,
    /// Decode steps replayed from CUDA graphs (`--cuda-graphs`).
    graphs: forward::StepGraphs,
}

/// Default prompt tokens per step until the router's warm-up sets it.
const DEFAULT_STEP_PROMPT_TOKENS: StepBudget = StepBudget {
    busy: 4096,
    idle: 4096,
};

impl Engine {
    /// Builds an engine around a loaded model and its (usually empty) adapter slots.
    pub fn new(
        model: LlamaModel,
        kv: KvCache,
        text: TextContext,
        info: EngineInfo,
        adapters: AdapterStore,
    ) -> Self {
        Self {
            model,
            kv,
            text,
            info,
            adapters,
            batches: HashMap::new(),
            step_prompt_tokens: DEFAULT_STEP_PROMPT_TOKENS,
            arrivals: 0,
            last_kept: None,
            kv_sizing: KvSizing::Fixed,
            graphs: Default::default(),
        }
    }

    /// Sizes the KV cache at the warm-up as `sizing` says (by default it keeps the cache it was
    /// built with).
    pub fn with_kv_sizing(mut self, sizing: KvSizing) -> Self {
        self.kv_sizing = sizing;
        self
    }

    /// The communicator of the model's tensor-parallel group.
    pub fn comm(&self) -> std::sync::Arc<dyn crate::comm::Comm> {
        self.model.comm()
    }

    fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// What `Info` reports.
    pub fn info(&self) -> ShardInfo {
        let cfg = self.model.config();
        ShardInfo {
            model_id: self.info.model_id.clone(),
            dtype: dtype_name(self.model.dtype()),
            device_type: if self.model.device().is_cpu() {
                "cpu"
            } else {
                "cuda"
            },
            rank: self.info.rank,
            world_size: self.info.world_size,
            vocab_size: cfg.vocab_size as u32,
            max_position_embeddings: cfg.max_position_embeddings as u32,
            eos_token_ids: self.text.eos_token_ids.clone(),
            kv_cache_tokens: self.kv.capacity_tokens() as u64,
            adapter_memory_bytes: self.adapters.budget(),
            max_adapter_slots: self.adapters.max_slots(),
            kv_block_tokens: self.kv.block_tokens() as u32,
        }
    }

    /// Admits a new batch and runs one step over it together with the `running` batches
    /// (merged into one): decode rows for the running sequences and, within the per-step
    /// budget, prompt chunks of the new ones. A prompt longer than the budget is finished
    /// by later steps; a request gets its first token in the step that computes its last
    /// prompt token.
    pub fn prefill(
        &mut self,
        batch: Batch,
        running: Vec<CachedBatch>,
    ) -> Result<StepResponse, EngineError> {
        let start = Instant::now();
        if self.batches.contains_key(&batch.id) {
            return Err(EngineError::InvalidRequest(format!(
                "batch {} already exists",
                batch.id
            )));
        }
        if let Some(missing) = running.iter().find(|b| !self.batches.contains_key(&b.id)) {
            return Err(EngineError::UnknownBatch(missing.id));
        }
        let limits = SeqLimits {
            vocab_size: self.vocab(),
            max_positions: self.max_positions(),
            eos_token_ids: &self.text.eos_token_ids,
        };
        let mut fresh = Vec::with_capacity(batch.requests.len());
        for req in &batch.requests {
            self.adapters
                .check_usable(req.adapter_slot)
                .map_err(|e| EngineError::InvalidRequest(format!("request {}: {e}", req.id)))?;
            let identity = self
                .adapters
                .get(req.adapter_slot)
                .map_or(AdapterIdentity::BASE, |a| {
                    AdapterIdentity::of_adapter(a.content_hash())
                });
            fresh.push(Sequence::new(
                req,
                self.arrivals + fresh.len() as u64,
                identity,
                limits,
            )?);
        }
        if let Some(dup) = fresh
            .iter()
            .find(|s| self.kv.len(s.id).is_some() || self.is_running(s.id))
        {
            return Err(EngineError::InvalidRequest(format!(
                "request {} is already running",
                dup.id
            )));
        }
        self.arrivals += fresh.len() as u64;
        let mut allocated = Vec::with_capacity(fresh.len());
        for s in &mut fresh {
            match schedule::allocate(s, &mut self.kv) {
                Ok(n) => {
                    s.computed = n;
                    s.cached_tokens = n;
                    allocated.push(s.id);
                }
                Err(e) => {
                    for id in allocated {
                        self.kv.free(id);
                    }
                    return Err(EngineError::KvCache(e.to_string()));
                }
            }
        }
        let id = running.first().map_or(batch.id, |b| b.id);
        let queued = router_queued(&running);
        let (mut seqs, ahead) = self.take_batches(&running);
        seqs.extend(fresh);
        self.run(id, seqs, ahead, queued, start)
    }

    /// Merges the given cached batches into the first one and runs one step: a token for
    /// each request that has its prompt computed, the next prompt chunks of the others.
    pub fn decode(&mut self, batches: Vec<CachedBatch>) -> Result<StepResponse, EngineError> {
        let start = Instant::now();
        let Some(first) = batches.first() else {
            return Err(EngineError::InvalidRequest("decode of no batch".into()));
        };
        let id = first.id;
        if let Some(missing) = batches.iter().find(|b| !self.batches.contains_key(&b.id)) {
            return Err(EngineError::UnknownBatch(missing.id));
        }
        let queued = router_queued(&batches);
        let (seqs, ahead) = self.take_batches(&batches);
        self.run(id, seqs, ahead, queued, start)
    }

    /// Whether a cached batch holds request `id` (a preempted one has no KV entry).
    fn is_running(&self, id: u64) -> bool {
        self.batches
            .values()
            .any(|b| b.seqs.iter().any(|s| s.id == id))
    }

    /// Removes the given batches, returning their sequences in arrival order and what steps
    /// run ahead left for them.
    fn take_batches(&mut self, batches: &[CachedBatch]) -> (Vec<Sequence>, ahead::Delivered) {
        let mut seqs = vec![];
        let mut delivered = ahead::Delivered::default();
        for b in batches {
            if let Some(state) = self.batches.remove(&b.id) {
                seqs.extend(state.seqs);
                if let Some(a) = state.ahead {
                    delivered.add(a);
                }
            }
        }
        seqs.sort_by_key(|s| s.arrival);
        (seqs, delivered)
    }

    /// Plans and runs one step over `seqs` (while `queued` requests wait in the router's
    /// queues), keeping the survivors as batch `id`, after the generations of the steps run
    /// ahead for them (`ahead`; its failure fails the call). When every sequence was decoded
    /// ahead, those generations are the answer and no step runs; otherwise the step takes every
    /// sequence, so one decoded ahead gets its next token too (two in this answer) and no
    /// forward pass is spent on part of the batch.
    fn run(
        &mut self,
        id: u64,
        seqs: Vec<Sequence>,
        ahead: ahead::Delivered,
        queued: u32,
        start: Instant,
    ) -> Result<StepResponse, EngineError> {
        if let Some(e) = ahead.failure {
            self.free_all(&seqs);
            return Err(e);
        }
        // A sequence the steps ahead advanced has its generation held.
        let held: FxHashSet<u64> = ahead.generations.iter().map(|g| g.request_id).collect();
        let all_ahead = seqs.iter().all(|s| held.contains(&s.id));
        let (mut generations, kept, timings) = match (all_ahead, ahead.timings) {
            // Everything was computed ahead: that step's timings.
            (true, Some(t)) => (vec![], seqs, t),
            _ => {
                let (generations, kept, mut timings) = self.step(seqs, queued)?;
                timings.comm_ns = self.model.take_comm_ns();
                timings.total_ns = start.elapsed().as_nanos() as u64;
                (generations, kept, timings)
            }
        };
        generations.splice(0..0, ahead.generations);
        let cached = self.keep(
            id,
            BatchState {
                seqs: kept,
                ahead: None,
            },
        );
        self.last_kept = cached.as_ref().map(|b| b.id);
        Ok(StepResponse {
            generations,
            batch: cached,
            timings,
            kv: self.kv.stats(),
        })
    }

    /// Runs one forward over what [`schedule::plan_step`] picks and advances every scheduled
    /// sequence. Finished sequences are freed; the rest are returned. On a model error every
    /// sequence's KV is freed.
    fn step(
        &mut self,
        mut seqs: Vec<Sequence>,
        queued: u32,
    ) -> Result<(Vec<Generation>, Vec<Sequence>, StepTimings), EngineError> {
        let planned = schedule::plan_step(&mut seqs, &mut self.kv, self.step_prompt_tokens, queued);
        let plan = match planned {
            Ok(p) if p.chunks.is_empty() && !seqs.is_empty() => Err(EngineError::KvCache(format!(
                "the kv cache ({} tokens) cannot hold the oldest sequence ({} tokens)",
                self.kv.capacity_tokens(),
                seqs[0].tokens.len()
            ))),
            other => other,
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.free_all(&seqs);
                return Err(e);
            }
        };
        let t0 = Instant::now();
        let rows: usize = plan.scheduled.iter().map(|s| s.len).sum();
        let seqs_waiting = seqs.iter().filter(|s| !s.decoding()).count();
        let StepPlan {
            scheduled,
            chunks,
            preempted,
        } = plan;
        let mut launch_ns = 0;
        // Greedy sequences whose token depends only on the argmax let the device choose it.
        let argmax_only = scheduled
            .iter()
            .all(|c| !c.all_logits && seqs.get(c.index).is_some_and(Sequence::argmax_only));
        let logits = self
            .forward_step(chunks)
            .map_err(|e| EngineError::Model(e.to_string()))
            .and_then(|t| {
                launch_ns = t0.elapsed().as_nanos() as u64;
                read_logits(&t, argmax_only).map_err(|e| EngineError::Model(Plain(&e).to_string()))
            });
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                self.free_all(&seqs);
                return Err(e);
            }
        };
        let forward_ns = t0.elapsed().as_nanos() as u64;
        let t1 = Instant::now();
        let outputs = self.sample_all(&mut seqs, &scheduled, &logits);
        let mut generations = Vec::with_capacity(outputs.len());
        let mut finished = vec![false; seqs.len()];
        let mut failure = None;
        for (index, out) in outputs {
            match out {
                Ok(Some(out)) => {
                    generations.push(out.generation);
                    finished[index] = out.finished;
                }
                Ok(None) => {}
                Err(e) => {
                    finished[index] = true;
                    failure.get_or_insert(e);
                }
            }
        }
        let mut kept = Vec::with_capacity(seqs.len());
        for (s, done) in seqs.into_iter().zip(finished) {
            if done {
                self.kv.free(s.id);
            } else {
                kept.push(s);
            }
        }
        if let Some(e) = failure {
            self.free_all(&kept);
            return Err(e);
        }
        let decode_ns = t1.elapsed().as_nanos() as u64;
        tracing::debug!(
            scheduled = scheduled.len(),
            rows,
            waiting = seqs_waiting,
            generations = generations.len(),
            preempted,
            forward_ms = forward_ns as f64 / 1e6,
            launch_ms = launch_ns as f64 / 1e6,
            sample_ms = decode_ns as f64 / 1e6,
            "step"
        );
        let timings = StepTimings {
            forward_ns,
            launch_ns,
            decode_ns,
            ..StepTimings::default()
        };
        Ok((generations, kept, timings))
    }

    fn free_all(&mut self, seqs: &[Sequence]) {
        for s in seqs {
            self.kv.free(s.id);
        }
    }

    /// Keeps `state` as batch `id` and returns its handle (None when it holds no sequence
    /// and nothing run ahead).
    fn keep(&mut self, id: u64, state: BatchState) -> Option<CachedBatch> {
        if state.seqs.is_empty() && state.ahead.is_none() {
            return None;
        }
        let cached = cached_batch(id, &state, &self.kv);
        self.batches.insert(id, state);
        Some(cached)
    }

    /// Keeps only `request_ids` in batch `batch_id`, freeing the others. Returns the batch's
    /// new handle (None when no request is left).
    pub fn filter(
        &mut self,
        batch_id: u64,
        request_ids: &[u64],
    ) -> Result<Option<CachedBatch>, EngineError> {
        let state = self
            .batches
            .remove(&batch_id)
            .ok_or(EngineError::UnknownBatch(batch_id))?;
        let (keep, drop): (Vec<_>, Vec<_>) = state
            .seqs
            .into_iter()
            .partition(|s| request_ids.contains(&s.id));
        for s in &drop {
            self.kv.free(s.id);
        }
        let ahead = state
            .ahead
            .and_then(|mut a| a.retain(request_ids).then_some(a));
        Ok(self.keep(batch_id, BatchState { seqs: keep, ahead }))
    }

    /// Drops batch `id`, or every batch.
    pub fn clear(&mut self, id: Option<u64>) {
        let ids: Vec<u64> = match id {
            Some(id) => vec![id],
            None => self.batches.keys().copied().collect(),
        };
        for id in ids {
            if let Some(state) = self.batches.remove(&id) {
                for s in state.seqs {
                    self.kv.free(s.id);
                }
            }
        }
    }

    /// Number of sequences holding KV memory (for tests and metrics).
    pub fn active_sequences(&self) -> usize {
        self.kv.num_sequences()
    }
}

/// Requests waiting in the router's queues, as it set them on the batches of a step.
fn router_queued(batches: &[CachedBatch]) -> u32 {
    batches.iter().map(|b| b.queued).max().unwrap_or(0)
}

/// The router's handle of batch `id`. Requests whose sequence ended in a step run ahead are
/// still in it until that step's generations are handed over.
fn cached_batch(id: u64, state: &BatchState, kv: &KvCache) -> CachedBatch {
    let seqs = &state.seqs;
    let mut request_ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
    if let Some(a) = &state.ahead {
        request_ids.extend(a.ended_ids(seqs));
    }
    CachedBatch {
        id,
        size: request_ids.len() as u32,
        request_ids,
        max_tokens: seqs.iter().map(|s| s.max_tokens as u32).sum(),
        current_tokens: seqs.iter().map(|s| kv.len(s.id).unwrap_or(0) as u32).sum(),
        pending_tokens: seqs
            .iter()
            .filter(|s| !s.decoding())
            .map(|s| s.pending() as u32)
            .sum(),
        preempted: seqs.iter().filter(|s| s.preempted).count() as u32,
        queued: 0,
        prefilling: seqs
            .iter()
            .filter(|s| !s.preempted && !s.decoding())
            .count() as u32,
    }
}

/// The torch-style dtype name.
pub fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F32 => "float32",
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "other",
    }
}
