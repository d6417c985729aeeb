//! Decode steps replayed from CUDA graphs (`--cuda-graphs`).
//!
//! A decode step launches a few hundred small kernels (about 280 for a 22-layer model with an
//! adapter). Issued one by one, each costs the host its launch and the GPU a gap before the
//! next; recorded once into a CUDA graph, the whole step is one launch that the GPU runs back to
//! back. vLLM, TGI and LoRAX replay their decode steps this way.
//!
//! **What is recorded.** A step in which every sequence decodes one token, on a GPU at world
//! size 1, whose ids and positions the model reads on the device ([`LlamaModel::build_rope_table`])
//! and whose LoRA delta can be recorded ([`LoraDelta::graph_key`]). Its rows are padded to a
//! graph's size ([`graph_rows`]: 1, 2, 4, then multiples of 8, as vLLM does), and every LoRA
//! call of the step maps rows to adapters the same way ([`super::RowSlots::uniform`]): one
//! adapter index per row among every adapter loaded ([`LoraDelta::graph_rows`]). Its key is
//! the padded size and, when a row uses an adapter, the loaded adapters (their slots and which
//! adapter each holds), not which row uses which: two steps with one key launch the same
//! kernels with the same arguments over the same buffers, only their inputs differ. So a batch
//! keeps its graph while requests leave it (down to the next size), join it (up to it) or
//! move between adapters; loading or evicting an adapter (a new merge) starts new graphs.
//! The first [`RECORD_AFTER`] steps of a key run eagerly (the first also fills the caches the
//! recorded kernels read: kernel modules, LoRA tables, the LoRA workspace); the next is
//! recorded and launched; later ones are replayed.
//!
//! **Padding.** An added row decodes token 0 at position 0 with the base model and writes its
//! key and value into the KV cache's pad block ([`KvCache::pad_block`]: a block no sequence
//! holds, taken when one is free and given back first when a sequence needs it), so it touches
//! no sequence's cache; its logits are computed and dropped. Without a pad block the step is
//! recorded at its own size.
//!
//! **Inputs.** Each graph owns its ids, positions, paged index (block tables padded to the
//! longest a request may reach, so that one layout serves while the sequences grow) and LoRA
//! row table, and writes its logits into rows of a buffer all graphs share. A replay writes
//! the step's words into them, then launches. Every buffer the recorded kernels read that a
//! cache owns (LoRA factor tables and workspace) is kept alive by the graph ([`keep`]), and
//! every tensor the step allocates is freed within it.
//!
//! **What cannot go in a graph**, and fails the recording instead (the step then runs eagerly,
//! and after [`MAX_FAILURES`] failures recording stops): copies from host memory (candle's
//! `index_select` and its ops on strided tensors upload their shapes; the step's own inputs are
//! written before the launch instead), synchronisation, reading back. Other threads (adapter
//! uploads) work on their own per-thread streams, which a recording on the engine thread's does
//! not capture.
//!
//! **Memory.** A graph's intermediate tensors come from the driver's graph memory, apart from the
//! pool the KV cache was fitted to (about one decode step's activations per graph; at most
//! [`DEFAULT_CAPACITY`] graphs are kept, the least recently used dropped). The graphs share one
//! logits buffer, grown by doubling: with the outgrown ones that older graphs keep, at most
//! twice the largest graph's rows.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, sys};
use candle_core::{DType, Device, Tensor};

use super::attention::GpuIndex;
use super::batch::{BatchPlan, ForwardBatch, graph_rows};
use super::gather_cuda::write_words;
use super::llama::{LlamaModel, StepInputs};
use super::paged_index::PagedIndex;
use super::{LoraDelta, ModelError};
use crate::adapters::upload_cache::pack_words;
use crate::kv_cache::KvCache;

/// Graphs kept at most.
pub const DEFAULT_CAPACITY: usize = 16;

/// Largest step (rows) recorded.
pub const MAX_ROWS: usize = 256;

/// Steps of one key run eagerly before it is recorded. A batch's composition (its rows, their
/// adapters) changes as requests join and leave; recording costs about one more step, so a key
/// is recorded only once it has lasted: under constant churn steps run as without graphs, in
/// steady decoding nearly every step is replayed.
pub const RECORD_AFTER: u32 = 3;

/// Failed recordings after which no more are tried.
pub const MAX_FAILURES: u32 = 3;

/// A device buffer a graph reads, kept alive with it.
pub type Kept = Arc<dyn Any + Send + Sync>;

/// A graph's LoRA row table (one adapter index per row, packed two to a word): an input that a
/// replay writes.
pub type RowTable = Arc<CudaSlice<u64>>;

thread_local! {
    /// The buffers the graph being recorded on this thread reads (`None`: not recording).
    static KEPT: RefCell<Option<Vec<Kept>>> = const { RefCell::new(None) };
    /// The LoRA row table of the graph being recorded on this thread, and its words.
    static ROWS: RefCell<Option<(RowTable, Vec<u32>)>> = const { RefCell::new(None) };
}

/// Keeps the buffer `make` returns alive as long as the graph being recorded on this thread,
/// if one is: a cached device table or workspace that recorded kernels read, which its cache
/// could otherwise free or replace while the graph still points at it. `make` runs only while
/// recording.
pub fn keep(make: impl FnOnce() -> Kept) {
    KEPT.with(|k| {
        if let Some(kept) = k.borrow_mut().as_mut() {
            kept.push(make());
        }
    });
}

/// Whether a graph is being recorded on this thread.
pub fn recording() -> bool {
    KEPT.with(|k| k.borrow().is_some())
}

/// The LoRA row table of the graph being recorded on this thread, if `map` is its content:
/// every LoRA call of a recorded step reads its rows from the graph's own table, which each
/// replay rewrites (the step's uniform mapping, [`super::RowSlots::uniform`]).
pub fn recorded_rows(map: &[u32]) -> Option<RowTable> {
    ROWS.with(|r| {
        r.borrow()
            .as_ref()
            .filter(|(_, words)| words.as_slice() == map)
            .map(|(table, _)| table.clone())
    })
}

/// Counts of the steps [`DecodeGraphs::forward`] ran, by how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct GraphStats {
    /// Steps run eagerly (not recordable, or before their key is recorded).
    pub eager: u64,
    /// Graphs recorded.
    pub recorded: u64,
    /// Steps replayed from a graph.
    pub replayed: u64,
    /// Recordings that failed.
    pub failed: u64,
}

/// What a graph is recorded for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Rows of the recorded step (padded, [`graph_rows`]).
    rows: usize,
    /// [`LoraDelta::graph_key`].
    lora: Vec<u64>,
}

/// A recorded graph. The driver's graph objects may be used from any thread as long as the calls
/// on one are serialised: an entry is only used through `&mut` [`DecodeGraphs`], which its
/// engine's thread owns.
struct Graph(CudaGraph);

// SAFETY: see [`Graph`]: calls on one graph never run concurrently (exclusive access).
unsafe impl Send for Graph {}

/// One recorded step and the buffers it reads and writes.
struct Entry {
    graph: Graph,
    inputs: StepInputs,
    /// The LoRA row table, when the step has adapters.
    lora_rows: Option<RowTable>,
    /// Its rows of the logits buffer ([`DecodeGraphs::logits`]; keeps that buffer alive).
    logits: Tensor,
    _kept: Vec<Kept>,
    used: u64,
}

/// The decode-step graphs of one engine.
pub struct DecodeGraphs {
    entries: HashMap<Key, Entry>,
    /// Keys run eagerly, not recorded yet: how many of their steps ran.
    seen: HashMap<Key, u32>,
    /// Keys whose recording failed: they run eagerly.
    refused: HashSet<Key>,
    capacity: usize,
    clock: u64,
    failures: u32,
    stats: GraphStats,
    /// The logits buffer the graphs write their rows into (see [`DecodeGraphs::logits`]).
    logits: Option<Tensor>,
}

impl DecodeGraphs {
    /// No graphs yet; at most `capacity` kept.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            seen: HashMap::new(),
            refused: HashSet::new(),
            capacity: capacity.max(1),
            clock: 0,
            failures: 0,
            stats: GraphStats::default(),
            logits: None,
        }
    }

    /// The first `rows` rows of the logits buffer that graphs write into, `[rows, vocab]` f32.
    /// One buffer serves every graph: a step's logits are read (sampled on the device or
    /// copied back) before the next step is launched on the stream, so graphs of different
    /// sizes need not each hold theirs (up to 128 MiB at 256 rows of a 128k vocabulary). It
    /// grows by doubling; a graph keeps the buffer it was recorded with.
    fn logits(&mut self, rows: usize, vocab: usize, device: &Device) -> Result<Tensor, ModelError> {
        let held = self.logits.as_ref().map_or(0, |t| t.dim(0).unwrap_or(0));
        if held < rows
            || self
                .logits
                .as_ref()
                .is_some_and(|t| t.dim(1).ok() != Some(vocab))
        {
            let grown = rows.max(2 * held).min(MAX_ROWS.max(rows));
            self.logits = Some(Tensor::zeros((grown, vocab), DType::F32, device)?);
        }
        match &self.logits {
            Some(t) => Ok(t.narrow(0, 0, rows)?),
            None => Err(ModelError::InvalidBatch("no logits buffer".into())),
        }
    }

    /// Drops every graph (their buffers may be gone: a new KV cache, another model).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.seen.clear();
        self.refused.clear();
        self.logits = None;
    }

    /// [`LlamaModel::forward`], replayed from a graph when the step can be (see the module
    /// docs); the same logits either way.
    pub fn forward(
        &mut self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        let plan = model.prepare(batch, kv)?;
        let logits = match self.key(model, &plan, kv, lora) {
            Some(key) if !self.refused.contains(&key) => {
                self.graphed(model, &plan, kv, lora, key)?
            }
            _ => self.eager(model, &plan, kv, lora)?,
        };
        LlamaModel::commit(&plan, kv)?;
        Ok(logits)
    }

    fn eager(
        &mut self,
        model: &LlamaModel,
        plan: &BatchPlan,
        kv: &KvCache,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        self.stats.eager += 1;
        let inputs = model.upload_inputs(plan, kv)?;
        model.compute(plan, kv, &inputs, lora)
    }

    /// The step's key when it can be recorded: its rows padded to a graph's size when the KV
    /// cache has a block for the padding rows to write into (else as many as it has).
    fn key(
        &self,
        model: &LlamaModel,
        plan: &BatchPlan,
        kv: &mut KvCache,
        lora: &dyn LoraDelta,
    ) -> Option<Key> {
        let rows = plan.num_rows();
        let decode = plan.chunks.iter().all(|c| c.len == 1) && plan.logit_rows.len() == rows;
        let inside = model.reads_ids_on_device(plan);
        let kernels = super::attention::recordable(kv, model.config().head_dim);
        if self.failures >= MAX_FAILURES
            || !kernels
            || !decode
            || !inside
            || rows == 0
            || rows > MAX_ROWS
        {
            return None;
        }
        let lora = lora.graph_key(&plan.row_slots)?;
        let padded = graph_rows(rows);
        let rows = if padded > rows && kv.pad_block().is_some() {
            padded
        } else {
            rows
        };
        Some(Key { rows, lora })
    }

    fn graphed(
        &mut self,
        model: &LlamaModel,
        plan: &BatchPlan,
        kv: &KvCache,
        lora: &dyn LoraDelta,
        key: Key,
    ) -> Result<Tensor, ModelError> {
        self.clock += 1;
        let rows = plan.num_rows();
        // The step as run eagerly (its own rows) and as recorded (padded to the key's rows),
        // both with one LoRA row table for every call.
        let uniform = plan.clone().with_uniform_rows();
        let padded;
        let step = match kv.held_pad_block() {
            Some(pad) if key.rows > rows => {
                padded = plan.padded(key.rows, pad);
                &padded
            }
            _ => &uniform,
        };
        if step.num_rows() != key.rows {
            return Err(ModelError::InvalidBatch(format!(
                "a CUDA graph step of {} rows for a key of {}",
                step.num_rows(),
                key.rows
            )));
        }
        // Block tables as long as a request may grow: one layout while the sequences grow.
        let stride = model.device_positions().div_ceil(kv.block_tokens());
        let index = || PagedIndex::with_stride(step, kv, stride);
        // The step's own rows of the graph's logits.
        let own = |logits: &Tensor| logits.narrow(0, 0, plan.logit_rows.len());
        if let Some(entry) = self.entries.get_mut(&key) {
            if let Err(e) = entry.write(step, &index()?, lora, model.device()) {
                // Not expected (a graph's buffers are its own): the graph is dropped and the
                // step runs eagerly.
                self.entries.remove(&key);
                self.refuse(key, &e, "could not write the inputs of its");
                return self.eager(model, &uniform, kv, lora);
            }
            entry.graph.0.launch().w()?;
            entry.used = self.clock;
            let logits = own(&entry.logits)?;
            self.stats.replayed += 1;
            // At the 1st, 2nd, 4th, 8th... replay: a log line whose spacing grows with the run.
            if self.stats.replayed.is_power_of_two() {
                let s = self.stats;
                tracing::info!(
                    replayed = s.replayed,
                    recorded = s.recorded,
                    eager = s.eager,
                    failed = s.failed,
                    graphs = self.entries.len(),
                    "decode steps replayed from CUDA graphs"
                );
            }
            return Ok(logits);
        }
        if self.seen.len() > 4 * self.capacity {
            self.seen.clear();
        }
        let runs = self.seen.entry(key.clone()).or_insert(0);
        *runs += 1;
        if *runs < RECORD_AFTER {
            // Not padded: the step's own rows, mapped as the recording will map them.
            return self.eager(model, &uniform, kv, lora);
        }
        let t0 = std::time::Instant::now();
        let logits = self.logits(
            step.logit_rows.len(),
            model.config().vocab_size,
            model.device(),
        )?;
        let entry = match record(model, step, kv, lora, &index()?, logits, self.clock) {
            Ok(entry) => entry,
            Err(e) => {
                self.refuse(key, &e, "could not be recorded into a");
                return self.eager(model, &uniform, kv, lora);
            }
        };
        entry.graph.0.launch().w()?;
        let logits = own(&entry.logits)?;
        self.stats.recorded += 1;
        tracing::debug!(
            rows = key.rows,
            own_rows = rows,
            graphs = self.entries.len() + 1,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "decode step recorded into a CUDA graph"
        );
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.seen.remove(&key);
        self.entries.insert(key, entry);
        Ok(logits)
    }
}

impl DecodeGraphs {
    /// Runs `key`'s steps eagerly from now on (a failed recording or replay: the step `what`
    /// its graph), and stops recording after [`MAX_FAILURES`].
    fn refuse(&mut self, key: Key, error: &ModelError, what: &str) {
        self.seen.remove(&key);
        if self.refused.len() > 4 * self.capacity {
            self.refused.clear();
        }
        let rows = key.rows;
        self.refused.insert(key);
        self.failures += 1;
        self.stats.failed += 1;
        tracing::warn!(
            rows,
            error = %error,
            failures = self.failures,
            "a decode step {what} CUDA graph: it runs eagerly{}",
            if self.failures >= MAX_FAILURES { "; no more are recorded" } else { "" }
        );
    }
}

impl Entry {
    /// Writes a step's ids, positions, index and LoRA rows (of `lora`) over the graph's.
    fn write(
        &mut self,
        step: &BatchPlan,
        index: &PagedIndex,
        lora: &dyn LoraDelta,
        device: &Device,
    ) -> Result<(), ModelError> {
        let (Some(ids), Some(gpu)) = (self.inputs.ids.as_ref(), self.inputs.gpu.as_mut()) else {
            return Err(ModelError::InvalidBatch(
                "a CUDA graph without its inputs".into(),
            ));
        };
        write_words(&ids.ids, &step.tokens)?;
        write_words(&ids.positions, &step.positions)?;
        gpu.rewrite(index, device)?;
        if let Some(table) = self.lora_rows.as_mut() {
            let (Device::Cuda(dev), Some(table)) = (device, Arc::get_mut(table)) else {
                return Err(ModelError::InvalidBatch(
                    "a CUDA graph's LoRA rows are shared".into(),
                ));
            };
            let words = pack_words(lora.graph_rows(&step.row_slots));
            if words.len() != table.len() {
                return Err(ModelError::InvalidBatch(
                    "a CUDA graph's LoRA rows rewritten with another length".into(),
                ));
            }
            dev.cuda_stream().memcpy_htod(&words, table).w()?;
        }
        Ok(())
    }
}

/// Records `step`'s step (not launched): its inputs uploaded, the layers captured from the
/// engine thread's stream, the logits copied into `logits` (`[rows, vocab]` f32, outside the
/// graph's memory).
fn record(
    model: &LlamaModel,
    step: &BatchPlan,
    kv: &KvCache,
    lora: &dyn LoraDelta,
    index: &PagedIndex,
    logits: Tensor,
    used: u64,
) -> Result<Entry, ModelError> {
    let device = model.device();
    let Device::Cuda(dev) = device else {
        return Err(ModelError::InvalidBatch("CUDA graphs need a GPU".into()));
    };
    let inputs = StepInputs {
        ids: Some(model.upload_ids(step)?),
        gpu: Some(GpuIndex::upload(index, device)?),
    };
    // The LoRA row table and its words, when a row uses an adapter.
    let rows = if step.row_slots.has_adapters() {
        let map = lora.graph_rows(&step.row_slots);
        Some((
            Arc::new(dev.clone_htod(&pack_words(map.iter().copied()))?),
            map,
        ))
    } else {
        None
    };
    let lora_rows = rows.as_ref().map(|(table, _)| table.clone());
    let stream = dev.cuda_stream();
    KEPT.with(|k| *k.borrow_mut() = Some(Vec::new()));
    ROWS.with(|r| *r.borrow_mut() = rows);
    let begun = stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w();
    let captured = begun.map_err(ModelError::from).and_then(|()| {
        // Every tensor of the step but `logits` is dropped before the capture ends: the graph
        // frees what it allocates.
        let out = model.compute(step, kv, &inputs, lora)?;
        logits.slice_set(&out, 0, 0)?;
        Ok(())
    });
    // The calls that failed inside a broken capture (frees among them) left their error in the
    // context, where the next call reports it, and `end_capture` makes such a call before it
    // ends the capture: cleared first, or the stream would stay capturing and every later step
    // fail. Cleared again after (a capture that ends broken).
    let _ = stream.context().check_err();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    let _ = stream.context().check_err();
    let kept = KEPT.with(|k| k.borrow_mut().take()).unwrap_or_default();
    ROWS.with(|r| r.borrow_mut().take());
    captured?;
    let graph =
        graph?.ok_or_else(|| ModelError::InvalidBatch("the capture gave no graph".into()))?;
    Ok(Entry {
        graph: Graph(graph),
        inputs,
        lora_rows,
        logits,
        _kept: kept,
        used,
    })
}
