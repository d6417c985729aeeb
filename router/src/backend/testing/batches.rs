//! The fake shard's batches, shaped like the real shard's paged KV engine: each step decodes the
//! sequences whose prompt is done and prefills the others within the per-step prompt budget
//! (Warmup's `max_prefill_tokens`), so a long prompt is prefilled over several steps and gets no
//! generation until its last chunk; a prefix cache reports `cached_tokens` (the configured
//! count) with the first token; [`FakeShard::preempt`] preempts the newest sequence for a few
//! steps. Cached batches report their pending prompt tokens and preempted requests, and every
//! step reports the KV block pool.
//!
//! Joining a running batch is checked against the shard's rules: no new request while one is
//! preempted, and new prompts within what pending tokens leave of the step budget (a single
//! long prompt may open a batch when nothing is pending).

use medley_proto::shard::v1 as pb;

use super::{FakeShard, State};
use crate::backend::client::ClientError;

/// Tokens per block of the fake KV pool.
pub(crate) const BLOCK_TOKENS: u32 = 64;
/// Blocks of the fake KV pool.
pub(crate) const TOTAL_BLOCKS: u32 = 1024;

/// A sequence on the fake shard.
pub(super) struct Seq {
    pub id: u64,
    pub slot: u32,
    generated: u32,
    max_new: u32,
    text: String,
    /// Prompt tokens.
    prompt: u32,
    /// Prompt tokens whose KV is held (cached ones included).
    computed: u32,
    /// Prompt tokens taken from the prefix cache.
    cached: u32,
    /// Preempted: its blocks are freed; it is recomputed when it resumes.
    preempted: bool,
}

impl Seq {
    fn new(r: &pb::Request, cached_tokens: u32) -> Self {
        let prompt = r.input_ids.len() as u32;
        let cached = cached_tokens.min(prompt.saturating_sub(1));
        Self {
            id: r.id,
            slot: r.adapter_slot,
            generated: 0,
            max_new: r
                .stopping_parameters
                .as_ref()
                .map_or(1, |s| s.max_new_tokens),
            text: String::new(),
            prompt,
            computed: cached,
            cached,
            preempted: false,
        }
    }

    /// Whether the next step decodes it (its prompt is done and it was not preempted).
    fn decoding(&self) -> bool {
        !self.preempted && self.computed >= self.prompt
    }

    /// Tokens to compute before it decodes again.
    fn pending(&self) -> u32 {
        if self.preempted {
            self.prompt + self.generated
        } else {
            self.prompt - self.computed
        }
    }

    fn blocks(&self) -> u32 {
        if self.preempted {
            0
        } else {
            (self.computed + self.generated).div_ceil(BLOCK_TOKENS)
        }
    }
}

/// One prefill or decode call the fake shard ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    /// `prefill` or `decode`.
    pub method: &'static str,
    /// The cached batches it ran (a prefill's running batches).
    pub batches: Vec<u64>,
    /// The requests it started (a prefill's new batch).
    pub new: Vec<u64>,
    /// The requests that produced a token.
    pub generated: Vec<u64>,
    /// Requests the answer's batch reported preempted.
    pub preempted: u32,
    /// Prompt tokens the answer's batch reported pending.
    pub pending: u32,
    /// The router's queue length, as set on the batches it ran.
    pub queued: u32,
}

impl FakeShard {
    /// Preempts the newest sequence of the running batch for the next `steps` steps.
    pub fn preempt(&self, steps: u32) {
        self.lock().preempt_steps = steps;
    }

    /// Every prefill and decode call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// One step starting `batch` and decoding the `running` batches merged with it.
    pub(super) fn prefill_step(
        &self,
        batch: pb::Batch,
        running: Vec<pb::CachedBatch>,
    ) -> Result<pb::PrefillResponse, ClientError> {
        if let Some(r) = batch.requests.iter().find(|r| {
            r.stopping_parameters
                .as_ref()
                .is_none_or(|s| s.max_new_tokens == 0)
        }) {
            // As the real shard: checked before the running batches are touched.
            return Err(ClientError::Rpc(tonic::Status::invalid_argument(format!(
                "request {}: max_new_tokens must be positive",
                r.id
            ))));
        }
        let mut state = self.lock();
        let mut seqs = take_batches(&mut state, &running);
        let pending: u32 = seqs.iter().map(Seq::pending).sum();
        let preempted = seqs.iter().filter(|s| s.preempted).count();
        let new_tokens: u32 = batch
            .requests
            .iter()
            .map(|r| r.input_ids.len() as u32)
            .sum();
        let last_tokens = batch
            .requests
            .last()
            .map_or(0, |r| r.input_ids.len() as u32);
        if preempted > 0 {
            state.violations.push(format!(
                "requests joined a batch with {preempted} preempted requests"
            ));
        }
        // The new requests wait for their first token in the step, as do the router's queued.
        let waiting = queued(&running).saturating_add(batch.requests.len() as u32);
        let room = step_budget(&state, &seqs, waiting).saturating_sub(pending);
        // Requests join while the budget has room; the last one may overflow it (its prompt
        // is chunked over the next steps).
        if new_tokens - last_tokens >= room {
            state.violations.push(format!(
                "new prompts of {new_tokens} tokens joined with {room} of the step budget left"
            ));
        }
        let new: Vec<Seq> = batch
            .requests
            .iter()
            .map(|r| Seq::new(r, self.cfg.cached_tokens))
            .collect();
        state.prefills.push(new.iter().map(|s| s.slot).collect());
        // Like the real shard: a request on an empty slot fails the prefill.
        if let Some(s) = new
            .iter()
            .find(|s| s.slot > 0 && !state.slots.contains_key(&s.slot))
        {
            let message = format!("request {} ran on empty slot {}", s.id, s.slot);
            state.violations.push(message.clone());
            return Err(ClientError::Rpc(tonic::Status::invalid_argument(message)));
        }
        let new_ids = new.iter().map(|s| s.id).collect();
        seqs.extend(new);
        let id = running.first().map_or(batch.id, |b| b.id);
        let (generations, batch) = run_step(&mut state, id, seqs, "prefill", &running, new_ids);
        Ok(pb::PrefillResponse {
            generations,
            batch,
            timings: None,
            kv: Some(kv_stats(&state)),
        })
    }

    /// One step over the cached `batches`.
    pub(super) fn decode_step(&self, batches: Vec<pb::CachedBatch>) -> pb::DecodeResponse {
        let mut state = self.lock();
        let seqs = take_batches(&mut state, &batches);
        let id = batches.first().map_or(0, |b| b.id);
        let (generations, batch) = run_step(&mut state, id, seqs, "decode", &batches, vec![]);
        pb::DecodeResponse {
            generations,
            batch,
            timings: None,
            kv: Some(kv_stats(&state)),
        }
    }
}

/// Takes the sequences of `batches` out of the shard (a violation for one it does not hold).
fn take_batches(state: &mut State, batches: &[pb::CachedBatch]) -> Vec<Seq> {
    let mut seqs = Vec::new();
    for b in batches {
        match state.batches.remove(&b.id) {
            Some(s) => seqs.extend(s),
            None => state
                .violations
                .push(format!("step over unknown batch {}", b.id)),
        }
    }
    seqs
}

/// Runs one step of `seqs` as batch `id`, keeps the unfinished ones and records the call.
fn run_step(
    state: &mut State,
    id: u64,
    seqs: Vec<Seq>,
    method: &'static str,
    ran: &[pb::CachedBatch],
    new: Vec<u64>,
) -> (Vec<pb::Generation>, Option<pb::CachedBatch>) {
    let (generations, alive) = step(state, seqs, queued(ran));
    let batch = cached(id, &alive);
    if !alive.is_empty() {
        state.batches.insert(id, alive);
    }
    state.calls.push(Call {
        method,
        batches: ran.iter().map(|b| b.id).collect(),
        new,
        generated: generations.iter().map(|g| g.request_id).collect(),
        preempted: batch.as_ref().map_or(0, |b| b.preempted),
        pending: batch.as_ref().map_or(0, |b| b.pending_tokens),
        queued: queued(ran),
    });
    (generations, batch)
}

/// The router's queue length, as it set it on the batches it sent.
fn queued(batches: &[pb::CachedBatch]) -> u32 {
    batches.iter().map(|b| b.queued).max().unwrap_or(0)
}

/// Prompt tokens of a step over `seqs`, like the real shard: by the decoding sequences and those
/// still prefilling (preempted ones aside), with `queued` more requests waiting.
fn step_budget(state: &State, seqs: &[Seq], queued: u32) -> u32 {
    let count = |decoding: bool| {
        seqs.iter()
            .filter(|s| !s.preempted && s.decoding() == decoding)
            .count() as u32
    };
    medley_proto::step::StepBudget::new(state.prefill_budget, state.idle_budget)
        .prompt_tokens(count(true), count(false).saturating_add(queued))
}

/// One step of `seqs`: the newest is preempted while [`FakeShard::preempt`] asks; the others
/// prefill (within the step's prompt budget) or decode one token. Returns the generations and
/// the unfinished sequences.
fn step(state: &mut State, mut seqs: Vec<Seq>, queued: u32) -> (Vec<pb::Generation>, Vec<Seq>) {
    let distinct: std::collections::HashSet<u32> =
        seqs.iter().map(|s| s.slot).filter(|s| *s > 0).collect();
    state.max_distinct_adapters = state.max_distinct_adapters.max(distinct.len());
    let victim = (state.preempt_steps > 0).then(|| seqs.len().saturating_sub(1));
    state.preempt_steps = state.preempt_steps.saturating_sub(1);
    let mut budget = step_budget(state, &seqs, queued);
    let mut generations = Vec::with_capacity(seqs.len());
    let mut alive = Vec::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        s.preempted = victim == Some(i);
        if s.preempted {
            continue;
        }
        let chunk = (s.prompt - s.computed).min(budget);
        s.computed += chunk;
        budget -= chunk;
    }
    for mut s in seqs {
        if s.preempted || s.computed < s.prompt {
            alive.push(s);
            continue;
        }
        let label = if s.slot == 0 {
            "base".to_string()
        } else if let Some(l) = state.slots.get(&s.slot) {
            l.label.clone()
        } else {
            state
                .violations
                .push(format!("request {} ran on empty slot {}", s.id, s.slot));
            "EMPTY".to_string()
        };
        let text = format!(" {label}");
        s.text.push_str(&text);
        s.generated += 1;
        let done = s.generated >= s.max_new;
        generations.push(pb::Generation {
            request_id: s.id,
            prefill_tokens: None,
            tokens: Some(pb::Tokens {
                ids: vec![s.slot],
                logprobs: vec![-0.5],
                texts: vec![text],
                is_special: vec![false],
            }),
            generated_text: done.then(|| pb::GeneratedText {
                text: s.text.clone(),
                generated_tokens: s.generated,
                finish_reason: pb::FinishReason::Length as i32,
                seed: None,
            }),
            top_tokens: vec![],
            cached_tokens: (s.generated == 1).then_some(s.cached),
        });
        if done {
            // Its blocks stay cached for their prefix.
            state.cached_blocks = (state.cached_blocks + s.blocks()).min(TOTAL_BLOCKS);
        } else {
            alive.push(s);
        }
    }
    (generations, alive)
}

/// The handle of batch `id` holding `seqs` (`None` when empty).
pub(super) fn cached(id: u64, seqs: &[Seq]) -> Option<pb::CachedBatch> {
    (!seqs.is_empty()).then(|| pb::CachedBatch {
        id,
        request_ids: seqs.iter().map(|s| s.id).collect(),
        size: seqs.len() as u32,
        max_tokens: 0,
        current_tokens: seqs.iter().map(|s| s.computed + s.generated).sum(),
        pending_tokens: seqs.iter().map(Seq::pending).sum(),
        preempted: seqs.iter().filter(|s| s.preempted).count() as u32,
        queued: 0,
        prefilling: seqs
            .iter()
            .filter(|s| !s.preempted && !s.decoding())
            .count() as u32,
    })
}

/// The block pool: blocks of the sequences held, and those cached for finished prefixes.
fn kv_stats(state: &State) -> pb::KvStats {
    let used: u32 = state.batches.values().flatten().map(Seq::blocks).sum();
    pb::KvStats {
        block_tokens: BLOCK_TOKENS,
        total_blocks: TOTAL_BLOCKS,
        used_blocks: used,
        cached_blocks: state
            .cached_blocks
            .min(TOTAL_BLOCKS - used.min(TOTAL_BLOCKS)),
    }
}
