//! The engine: owns the model, the KV cache and the cached batches, and runs prefill and decode
//! steps. It is driven from a single thread (see [`EngineHandle`]) so device and collective calls
//! never interleave.

mod adapters;
mod handle;
mod heap;
mod sequence;
mod text;
mod types;

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use crate::adapters::{AdapterError, AdapterStore};
use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, LlamaModel, SeqChunk};

pub use handle::{EngineHandle, EngineThreadSettings};
use sequence::Sequence;
pub use text::TextContext;
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
}

/// A batch whose KV state lives here.
struct BatchState {
    seqs: Vec<Sequence>,
}

/// Owns the model, the KV cache, the adapter slots and every cached batch.
pub struct Engine {
    model: LlamaModel,
    kv: KvCache,
    text: TextContext,
    info: EngineInfo,
    adapters: AdapterStore,
    batches: HashMap<u64, BatchState>,
}

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
        }
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
            kv_block_tokens: crate::kv_cache::BLOCK_TOKENS as u32,
        }
    }

    /// Runs a worst-case prefill (the router's prefill budget, split into requests of at most
    /// `max_input_tokens`) to check the model runs, then frees it. Returns the KV capacity.
    pub fn warmup(&mut self, req: &WarmupParams) -> Result<WarmupResult, EngineError> {
        let per_req = (req.max_input_tokens as usize).clamp(1, self.max_positions() - 1);
        let mut remaining = (req.max_prefill_tokens as usize).max(1);
        let mut chunks = vec![];
        let mut id = u64::MAX;
        while remaining > 0 {
            let n = remaining.min(per_req);
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
        let ids: Vec<u64> = chunks.iter().map(|c| c.seq_id).collect();
        let result = (|| {
            for c in &chunks {
                self.kv
                    .allocate(c.seq_id, c.tokens.len())
                    .map_err(|e| EngineError::KvCache(e.to_string()))?;
            }
            self.model
                .forward(&ForwardBatch { chunks }, &mut self.kv, &self.adapters)
                .map_err(|e| EngineError::Model(e.to_string()))
        })();
        for id in ids {
            self.kv.free(id);
        }
        result?;
        Ok(WarmupResult {
            max_supported_total_tokens: self.kv.capacity_tokens() as u64,
        })
    }

    /// Prefills a new batch: runs every prompt, samples each first token.
    pub fn prefill(&mut self, batch: Batch) -> Result<StepResponse, EngineError> {
        let start = Instant::now();
        if self.batches.contains_key(&batch.id) {
            return Err(EngineError::InvalidRequest(format!(
                "batch {} already exists",
                batch.id
            )));
        }
        let mut seqs = Vec::with_capacity(batch.requests.len());
        for req in &batch.requests {
            self.adapters
                .check_usable(req.adapter_slot)
                .map_err(|e| EngineError::InvalidRequest(format!("request {}: {e}", req.id)))?;
            seqs.push(Sequence::new(
                req,
                self.vocab(),
                self.max_positions(),
                &self.text.eos_token_ids,
            )?);
        }
        let mut allocated = Vec::with_capacity(seqs.len());
        for s in &seqs {
            if let Err(e) = self.kv.allocate(s.id, s.max_tokens) {
                for id in allocated {
                    self.kv.free(id);
                }
                return Err(EngineError::KvCache(e.to_string()));
            }
            allocated.push(s.id);
        }
        let chunks = seqs
            .iter()
            .map(|s| SeqChunk {
                seq_id: s.id,
                tokens: s.tokens.clone(),
                start_pos: 0,
                adapter_slot: s.adapter_slot,
                all_logits: s.prefill_logprobs,
            })
            .collect();
        let (generations, kept, forward_ns, decode_ns) = self.step(seqs, chunks, true)?;
        let cached = self.store(batch.id, kept);
        Ok(StepResponse {
            generations,
            batch: cached,
            timings: StepTimings {
                forward_ns,
                comm_ns: self.model.take_comm_ns(),
                decode_ns,
                total_ns: start.elapsed().as_nanos() as u64,
            },
        })
    }

    /// Merges the given cached batches into the first one and generates one token for each
    /// of their requests.
    pub fn decode(&mut self, batches: Vec<CachedBatch>) -> Result<StepResponse, EngineError> {
        let start = Instant::now();
        let Some(first) = batches.first() else {
            return Err(EngineError::InvalidRequest("decode of no batch".into()));
        };
        let id = first.id;
        if let Some(missing) = batches.iter().find(|b| !self.batches.contains_key(&b.id)) {
            return Err(EngineError::UnknownBatch(missing.id));
        }
        let mut seqs = vec![];
        for b in &batches {
            if let Some(state) = self.batches.remove(&b.id) {
                seqs.extend(state.seqs);
            }
        }
        let chunks = seqs
            .iter()
            .map(|s| SeqChunk {
                seq_id: s.id,
                tokens: vec![*s.tokens.last().unwrap_or(&0)],
                start_pos: s.tokens.len() - 1,
                adapter_slot: s.adapter_slot,
                all_logits: false,
            })
            .collect();
        let (generations, kept, forward_ns, decode_ns) = self.step(seqs, chunks, false)?;
        let cached = self.store(id, kept);
        Ok(StepResponse {
            generations,
            batch: cached,
            timings: StepTimings {
                forward_ns,
                comm_ns: self.model.take_comm_ns(),
                decode_ns,
                total_ns: start.elapsed().as_nanos() as u64,
            },
        })
    }

    /// Runs one forward over `chunks` and advances every sequence. Finished sequences are freed;
    /// the rest are returned. On a model error every sequence's KV is freed.
    fn step(
        &mut self,
        mut seqs: Vec<Sequence>,
        chunks: Vec<SeqChunk>,
        prefill: bool,
    ) -> Result<(Vec<Generation>, Vec<Sequence>, u64, u64), EngineError> {
        let t0 = Instant::now();
        let logits = self
            .model
            .forward(&ForwardBatch { chunks }, &mut self.kv, &self.adapters)
            .map_err(|e| EngineError::Model(e.to_string()))
            .and_then(|t| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| EngineError::Model(e.to_string()))
            });
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                for s in &seqs {
                    self.kv.free(s.id);
                }
                return Err(e);
            }
        };
        let forward_ns = t0.elapsed().as_nanos() as u64;
        let t1 = Instant::now();
        let outputs = self.sample_all(&mut seqs, &logits, prefill);
        let mut generations = Vec::with_capacity(seqs.len());
        let mut kept = Vec::with_capacity(seqs.len());
        let mut failure = None;
        for (s, out) in seqs.drain(..).zip(outputs) {
            match out {
                Ok(out) => {
                    generations.push(out.generation);
                    if out.finished {
                        self.kv.free(s.id);
                    } else {
                        kept.push(s);
                    }
                }
                Err(e) => {
                    self.kv.free(s.id);
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            for s in &kept {
                self.kv.free(s.id);
            }
            return Err(e);
        }
        let decode_ns = t1.elapsed().as_nanos() as u64;
        tracing::debug!(
            prefill,
            sequences = generations.len(),
            forward_ms = forward_ns as f64 / 1e6,
            sample_ms = decode_ns as f64 / 1e6,
            "step"
        );
        Ok((generations, kept, forward_ns, decode_ns))
    }

    /// Picks every sequence's next token from its logits rows (and, in a prefill that asked
    /// for them, the prompt's logprobs), in parallel over the sequences on the model's pool.
    fn sample_all(
        &self,
        seqs: &mut [Sequence],
        logits: &[f32],
        prefill: bool,
    ) -> Vec<Result<sequence::StepOutput, EngineError>> {
        let vocab = self.vocab();
        let max_positions = self.max_positions();
        let text = &self.text;
        let rows_of = |s: &Sequence| {
            if prefill && s.prefill_logprobs {
                s.prompt_len.max(1)
            } else {
                1
            }
        };
        let needed: usize = seqs.iter().map(|s| rows_of(s) * vocab).sum();
        if logits.len() != needed {
            let msg = format!("{} logits, expected {needed}", logits.len());
            return seqs
                .iter()
                .map(|_| Err(EngineError::Model(msg.clone())))
                .collect();
        }
        let mut rest = logits;
        let mut work = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let rows = rows_of(s);
            let (block, tail) = rest.split_at(rows * vocab);
            rest = tail;
            work.push((s, block, rows));
        }
        let run = |(s, block, rows): (&mut Sequence, &[f32], usize)| {
            let prompt_tokens =
                (prefill && s.prefill_logprobs).then(|| s.prompt_tokens(block, vocab, text));
            let last = &block[(rows - 1) * vocab..];
            s.step(last, text, max_positions).map(|mut out| {
                out.generation.prefill_tokens = prompt_tokens;
                out
            })
        };
        if work.len() < 2 {
            return work.into_iter().map(run).collect();
        }
        self.model
            .device()
            .with_context(|| work.into_par_iter().map(run).collect())
    }

    /// Keeps `seqs` as batch `id` and returns its handle (None when empty).
    fn store(&mut self, id: u64, seqs: Vec<Sequence>) -> Option<CachedBatch> {
        if seqs.is_empty() {
            return None;
        }
        let cached = cached_batch(id, &seqs, &self.kv);
        self.batches.insert(id, BatchState { seqs });
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
        Ok(self.store(batch_id, keep))
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

fn cached_batch(id: u64, seqs: &[Sequence], kv: &KvCache) -> CachedBatch {
    CachedBatch {
        id,
        request_ids: seqs.iter().map(|s| s.id).collect(),
        size: seqs.len() as u32,
        max_tokens: seqs.iter().map(|s| s.max_tokens as u32).sum(),
        current_tokens: seqs.iter().map(|s| kv.len(s.id).unwrap_or(0) as u32).sum(),
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
