//! An in-memory [`ShardApi`] for scheduler tests: cached batches, staged (prepared) adapters,
//! adapter slots with a byte budget, configurable adapters (size, rank, failures), gates that
//! hold prepares, and a record of every call plus any rule the router broke (a request on an
//! empty slot, an offload of a slot that running requests use, a slot out of range, an install
//! over the byte budget or of an adapter that was never prepared).
//!
//! Generated token `i` of a request has id = its slot and text `" <label>"`, where the label is
//! `base` for slot 0, the adapter id for a single adapter and `merge(<ids>)` for a merge, so a
//! response shows which weights produced it. Its batches (chunked prefill, prefix cache,
//! preemption, KV pool) are in [`batches`].

mod batches;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use medley_proto::shard::v1 as pb;
use medley_spec::{MergeSpec, Strategy};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub(crate) use batches::{BLOCK_TOKENS, Call, TOTAL_BLOCKS};
use batches::{Seq, cached};

use super::client::ClientError;
use super::queue::Entry;
use super::shard_api::ShardApi;
use crate::error::InferError;
use crate::infer::{
    AdapterRef, AdapterSource, AdapterSpec, InferStreamResponse, MergedAdapterSpec,
    ValidGenerateRequest, ValidParameters, ValidStoppingParameters,
};

/// An adapter the fake shard knows.
#[derive(Debug, Clone)]
pub(crate) struct FakeAdapter {
    /// Bytes it occupies in a slot.
    pub bytes: u64,
    /// LoRA rank.
    pub rank: u32,
    /// Loading it fails with this status.
    pub failure: Option<(tonic::Code, String)>,
}

impl FakeAdapter {
    /// A loadable adapter.
    pub fn new(bytes: u64, rank: u32) -> Self {
        Self {
            bytes,
            rank,
            failure: None,
        }
    }

    /// An adapter whose load fails with `code`.
    pub fn failing(code: tonic::Code, message: &str) -> Self {
        Self {
            bytes: 1,
            rank: 8,
            failure: Some((code, message.into())),
        }
    }
}

/// Shape of the fake shard.
#[derive(Debug, Clone)]
pub(crate) struct FakeShardConfig {
    /// Adapter slots.
    pub slots: u32,
    /// Adapter bytes the shard holds.
    pub budget: u64,
    /// The budget the shard fits itself to at warm-up, as a GPU shard does to its free memory
    /// (`Info` reports `budget` before and this after).
    pub warmup_budget: Option<u64>,
    /// Pause before every prefill and decode step.
    pub step_delay: Duration,
    /// Known adapters by id.
    pub adapters: HashMap<String, FakeAdapter>,
    /// Prompt tokens each request finds in the prefix cache (at most its prompt but one).
    pub cached_tokens: u32,
}

impl Default for FakeShardConfig {
    fn default() -> Self {
        Self {
            slots: 4,
            budget: 1000,
            warmup_budget: None,
            step_delay: Duration::ZERO,
            adapters: HashMap::new(),
            cached_tokens: 0,
        }
    }
}

struct Slot {
    label: String,
    bytes: u64,
}

#[derive(Default)]
struct State {
    batches: HashMap<u64, Vec<Seq>>,
    slots: HashMap<u32, Slot>,
    staged: HashMap<u64, Slot>,
    prepares: Vec<pb::PrepareAdapterRequest>,
    installs: Vec<(u64, u32)>,
    offloads: Vec<u32>,
    /// Most bytes the slots held at once.
    max_used_bytes: u64,
    /// Slots of the requests of every prefill, in order.
    prefills: Vec<Vec<u32>>,
    violations: Vec<String>,
    /// Most distinct adapter slots (0 excluded) in one forward pass.
    max_distinct_adapters: usize,
    /// Prompt tokens per step (Warmup's `max_prefill_tokens`).
    prefill_budget: u32,
    /// Prompt tokens of a step without decodes (Warmup's `max_idle_prefill_tokens`).
    idle_budget: u32,
    /// Steps the newest sequence stays preempted.
    preempt_steps: u32,
    /// Blocks kept for the prefixes of finished sequences.
    cached_blocks: u32,
    /// Every prefill and decode call.
    calls: Vec<Call>,
    /// The adapter byte budget (the config's, until a warm-up fits it).
    budget: u64,
}

/// The fake shard; clones share state.
#[derive(Clone)]
pub(crate) struct FakeShard {
    cfg: Arc<FakeShardConfig>,
    state: Arc<Mutex<State>>,
    gates: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    /// The process: whether it runs, and its instance id.
    process: Arc<Mutex<(bool, u64)>>,
}

/// A slot label: what a request running on it reports.
fn label(spec: &pb::AdapterSpec) -> String {
    match &spec.kind {
        Some(pb::adapter_spec::Kind::Single(r)) => r.id.clone(),
        Some(pb::adapter_spec::Kind::Merged(m)) => format!(
            "merge({})",
            m.components
                .iter()
                .filter_map(|c| c.adapter.as_ref().map(|a| a.id.as_str()))
                .collect::<Vec<_>>()
                .join(",")
        ),
        None => "none".into(),
    }
}

impl FakeShard {
    /// A fake shard with `cfg`.
    pub fn new(cfg: FakeShardConfig) -> Self {
        let budget = cfg.budget;
        Self {
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(State {
                prefill_budget: u32::MAX,
                idle_budget: u32::MAX,
                budget,
                ..State::default()
            })),
            gates: Arc::default(),
            process: Arc::new(Mutex::new((true, 1))),
        }
    }

    /// The process dies: every call fails as a broken connection would, and what it held
    /// (batches, slots, staged adapters) is gone.
    pub fn crash(&self) {
        self.process.lock().expect("process").0 = false;
        let mut state = self.lock();
        state.batches.clear();
        state.slots.clear();
        state.staged.clear();
    }

    /// The process does not answer for `pause`, then answers again as before.
    pub async fn blip(&self, pause: Duration) {
        self.process.lock().expect("process").0 = false;
        tokio::time::sleep(pause).await;
        self.process.lock().expect("process").0 = true;
    }

    /// A new process starts (empty, with a new instance id).
    pub fn restart(&self) {
        self.crash();
        let mut process = self.process.lock().expect("process");
        *process = (true, process.1 + 1);
    }

    /// Fails like a call to a dead process.
    fn alive(&self) -> Result<u64, ClientError> {
        match *self.process.lock().expect("process") {
            (true, instance) => Ok(instance),
            (false, _) => Err(ClientError::Connect {
                path: "fake".into(),
                message: "connection refused".into(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake shard lock")
    }

    /// Holds every load involving `id` until [`release`](Self::release).
    pub fn hold(&self, id: &str) {
        self.gates
            .lock()
            .expect("gates")
            .insert(id.into(), Arc::new(Semaphore::new(0)));
    }

    /// Lets loads involving `id` proceed.
    pub fn release(&self, id: &str) {
        if let Some(g) = self.gates.lock().expect("gates").remove(id) {
            g.add_permits(Semaphore::MAX_PERMITS >> 4);
        }
    }

    /// Every PrepareAdapter call so far.
    pub fn loads(&self) -> Vec<pb::PrepareAdapterRequest> {
        self.lock().prepares.clone()
    }

    /// Labels of the PrepareAdapter calls so far.
    pub fn load_labels(&self) -> Vec<String> {
        self.lock()
            .prepares
            .iter()
            .filter_map(|l| l.spec.as_ref().map(label))
            .collect()
    }

    /// Target slots of the InstallAdapter calls so far.
    pub fn install_slots(&self) -> Vec<u32> {
        self.lock().installs.iter().map(|(_, slot)| *slot).collect()
    }

    /// Most bytes the slots held at once.
    pub fn max_used_bytes(&self) -> u64 {
        self.lock().max_used_bytes
    }

    /// Adapters staged now (prepared, not installed or discarded).
    pub fn staged(&self) -> usize {
        self.lock().staged.len()
    }

    /// Every OffloadAdapter call so far.
    pub fn offloads(&self) -> Vec<u32> {
        self.lock().offloads.clone()
    }

    /// Rules the router broke (empty when it behaved).
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Slots of the requests of every prefill, in order.
    pub fn prefills(&self) -> Vec<Vec<u32>> {
        self.lock().prefills.clone()
    }

    /// Most distinct adapters in one forward pass.
    pub fn max_distinct_adapters(&self) -> usize {
        self.lock().max_distinct_adapters
    }

    /// Occupied slots and their labels.
    pub fn resident(&self) -> HashMap<u32, String> {
        self.lock()
            .slots
            .iter()
            .map(|(s, l)| (*s, l.label.clone()))
            .collect()
    }

    /// The size of the adapter `spec` names, or the error its prepare fails with.
    fn check_prepare(&self, spec: Option<&pb::AdapterSpec>) -> Result<u64, tonic::Status> {
        let spec = spec
            .and_then(|s| s.kind.as_ref())
            .ok_or_else(|| tonic::Status::invalid_argument("no spec"))?;
        let lookup = |id: &str| -> Result<FakeAdapter, tonic::Status> {
            let a = self
                .cfg
                .adapters
                .get(id)
                .ok_or_else(|| tonic::Status::not_found(format!("adapter '{id}' not found")))?;
            match &a.failure {
                Some((code, msg)) => Err(tonic::Status::new(*code, msg.clone())),
                None => Ok(a.clone()),
            }
        };
        Ok(match spec {
            pb::adapter_spec::Kind::Single(r) => lookup(&r.id)?.bytes,
            pb::adapter_spec::Kind::Merged(m) => {
                let parts = m
                    .components
                    .iter()
                    .map(|c| lookup(c.adapter.as_ref().map_or("", |a| a.id.as_str())))
                    .collect::<Result<Vec<_>, _>>()?;
                let strategy = medley_spec::Strategy::from_str(&m.strategy)
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                let ranks: std::collections::BTreeSet<u32> = parts.iter().map(|p| p.rank).collect();
                if strategy.requires_equal_rank() && ranks.len() > 1 {
                    return Err(tonic::Status::invalid_argument(format!(
                        "cannot merge adapters of different ranks {ranks:?} with `{}`; use `cat` (or an SVD strategy)",
                        m.strategy
                    )));
                }
                parts.iter().map(|p| p.bytes).sum()
            }
        })
    }
}

impl ShardApi for FakeShard {
    async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        self.alive()?;
        Ok(pb::InfoResponse {
            model_id: "fake".into(),
            dtype: "float32".into(),
            device_type: "cpu".into(),
            rank: 0,
            world_size: 1,
            vocab_size: 100,
            max_position_embeddings: 1024,
            eos_token_ids: vec![2],
            kv_cache_tokens: u64::from(BLOCK_TOKENS * TOTAL_BLOCKS),
            adapter_memory_bytes: self.lock().budget,
            max_adapter_slots: self.cfg.slots,
            kv_block_tokens: BLOCK_TOKENS,
        })
    }

    async fn health(&self) -> Result<u64, ClientError> {
        self.alive()
    }

    async fn warmup(&self, req: pb::WarmupRequest) -> Result<u64, ClientError> {
        self.alive()?;
        if let Some(budget) = self.cfg.warmup_budget {
            self.lock().budget = budget;
        }
        if req.max_prefill_tokens > 0 {
            let mut state = self.lock();
            state.prefill_budget = req.max_prefill_tokens;
            state.idle_budget = req.max_idle_prefill_tokens.max(req.max_prefill_tokens);
        }
        Ok(u64::from(BLOCK_TOKENS * TOTAL_BLOCKS))
    }

    async fn prefill(
        &self,
        batch: pb::Batch,
        running: Vec<pb::CachedBatch>,
    ) -> Result<pb::PrefillResponse, ClientError> {
        self.alive()?;
        tokio::time::sleep(self.cfg.step_delay).await;
        self.alive()?;
        self.prefill_step(batch, running)
    }

    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
    ) -> Result<pb::DecodeResponse, ClientError> {
        self.alive()?;
        tokio::time::sleep(self.cfg.step_delay).await;
        self.alive()?;
        Ok(self.decode_step(batches))
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        self.alive()?;
        let mut state = self.lock();
        let Some(seqs) = state.batches.get_mut(&batch_id) else {
            return Err(ClientError::Rpc(tonic::Status::not_found("no such batch")));
        };
        seqs.retain(|s| request_ids.contains(&s.id));
        let cached = cached(batch_id, seqs);
        if cached.is_none() {
            state.batches.remove(&batch_id);
        }
        Ok(cached)
    }

    async fn clear_cache(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.alive()?;
        let mut state = self.lock();
        match id {
            Some(id) => {
                state.batches.remove(&id);
            }
            None => state.batches.clear(),
        }
        Ok(())
    }

    async fn prepare_adapter(
        &self,
        req: pb::PrepareAdapterRequest,
    ) -> Result<pb::PrepareAdapterResponse, ClientError> {
        self.alive()?;
        let ids: Vec<String> = match req.spec.as_ref().and_then(|s| s.kind.as_ref()) {
            Some(pb::adapter_spec::Kind::Single(r)) => vec![r.id.clone()],
            Some(pb::adapter_spec::Kind::Merged(m)) => m
                .components
                .iter()
                .filter_map(|c| c.adapter.as_ref().map(|a| a.id.clone()))
                .collect(),
            None => vec![],
        };
        self.lock().prepares.push(req.clone());
        let gates: Vec<Arc<Semaphore>> = {
            let g = self.gates.lock().expect("gates");
            ids.iter().filter_map(|id| g.get(id).cloned()).collect()
        };
        for gate in gates {
            let _permit = gate.acquire().await;
        }
        let bytes = self
            .check_prepare(req.spec.as_ref())
            .map_err(ClientError::Rpc)?;
        let label = req.spec.as_ref().map(label).unwrap_or_default();
        let mut state = self.lock();
        if state.staged.insert(req.id, Slot { label, bytes }).is_some() {
            state
                .violations
                .push(format!("staging id {} prepared twice", req.id));
        }
        Ok(pb::PrepareAdapterResponse {
            bytes,
            rank: 8,
            content_hash: String::new(),
            load_ns: 1_000_000,
            merge_ns: if ids.len() > 1 { 2_000_000 } else { 0 },
        })
    }

    async fn install_adapter(
        &self,
        id: u64,
        slot: u32,
    ) -> Result<pb::InstallAdapterResponse, ClientError> {
        self.alive()?;
        let mut state = self.lock();
        state.installs.push((id, slot));
        if slot == 0 || slot > self.cfg.slots {
            state.violations.push(format!(
                "install into slot {slot} out of 1..={}",
                self.cfg.slots
            ));
        }
        let Some(staged) = state.staged.remove(&id) else {
            state
                .violations
                .push(format!("install of staging id {id}, which is not staged"));
            return Err(ClientError::Rpc(tonic::Status::not_found("not staged")));
        };
        let used: u64 = state
            .slots
            .iter()
            .filter(|(s, _)| **s != slot)
            .map(|(_, l)| l.bytes)
            .sum();
        let budget = state.budget;
        if used + staged.bytes > budget {
            state.violations.push(format!(
                "install of {} bytes into slot {slot} with {} of {budget} bytes free",
                staged.bytes,
                budget.saturating_sub(used),
            ));
            return Err(ClientError::Rpc(tonic::Status::internal(
                "the router over-committed the adapter memory budget",
            )));
        }
        let bytes = staged.bytes;
        state.slots.insert(slot, staged);
        state.max_used_bytes = state.max_used_bytes.max(used + bytes);
        Ok(pb::InstallAdapterResponse {
            bytes,
            content_hash: String::new(),
        })
    }

    async fn discard_adapter(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.alive()?;
        let mut state = self.lock();
        match id {
            Some(id) => {
                state.staged.remove(&id);
            }
            None => state.staged.clear(),
        }
        Ok(())
    }

    async fn offload_adapter(&self, slot: u32) -> Result<(), ClientError> {
        self.alive()?;
        let mut state = self.lock();
        state.offloads.push(slot);
        let users: Vec<u64> = state
            .batches
            .values()
            .flatten()
            .filter(|s| s.slot == slot)
            .map(|s| s.id)
            .collect();
        if !users.is_empty() {
            state.violations.push(format!(
                "slot {slot} offloaded while requests {users:?} use it"
            ));
        }
        state.slots.remove(&slot);
        Ok(())
    }

    async fn list_adapters(&self) -> Result<pb::ListAdaptersResponse, ClientError> {
        self.alive()?;
        Ok(pb::ListAdaptersResponse {
            slots: self
                .lock()
                .slots
                .iter()
                .map(|(s, l)| pb::AdapterSlot {
                    slot: *s,
                    content_hash: String::new(),
                    bytes: l.bytes,
                })
                .collect(),
        })
    }
}

/// A request of `input` prompt tokens and `max_new` new tokens on `adapter`.
pub(crate) fn request(adapter: AdapterSpec, input: usize, max_new: u32) -> ValidGenerateRequest {
    ValidGenerateRequest {
        inputs: "x".into(),
        input_ids: vec![1; input],
        parameters: ValidParameters {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        },
        stopping_parameters: ValidStoppingParameters {
            max_new_tokens: max_new,
            stop_sequences: vec![],
            ignore_eos_token: false,
        },
        decoder_input_details: false,
        top_n_tokens: 0,
        adapter,
    }
}

/// The receiving end of a request's events.
pub(crate) type Events = UnboundedReceiver<Result<InferStreamResponse, InferError>>;

/// A queued entry for `request` and the receiver of its events.
pub(crate) fn entry(request: ValidGenerateRequest) -> (Entry, Events) {
    let (tx, rx) = unbounded_channel();
    (Entry::new(request, tx), rx)
}

/// One hub adapter.
pub(crate) fn single(id: &str) -> AdapterSpec {
    AdapterSpec::Single(AdapterRef {
        id: id.into(),
        source: AdapterSource::Hub,
        revision: None,
        api_token: None,
    })
}

/// A merge of hub adapters with weight 1 each (density 0.5 when the strategy needs one).
pub(crate) fn merge(ids: &[&str], strategy: Strategy) -> AdapterSpec {
    let mut spec = MergeSpec::new(strategy, vec![1.0; ids.len()]);
    if strategy.uses_density() {
        spec = spec.with_density(0.5);
    }
    AdapterSpec::Merged(MergedAdapterSpec {
        components: ids
            .iter()
            .map(|id| match single(id) {
                AdapterSpec::Single(r) => r,
                _ => unreachable!("single() builds a single adapter"),
            })
            .collect(),
        merge: spec,
    })
}
