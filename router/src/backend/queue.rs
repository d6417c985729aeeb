//! The batch builder: which waiting requests, across the base model's queue and the queues of
//! resident adapters, join the next prefill under the prefill-token, total-token and batch-size
//! budgets (TGI v3 policy, no preemption) and the cap on distinct adapters per batch.
//!
//! Requests are taken one at a time from the queue that comes first in
//! [`Priority`](super::registry::Priority) order (oldest request first, adapters whose turn is
//! spent after the others). Queues of adapters that are not resident are skipped, not waited
//! for; so are adapters that would exceed `max_active_adapters`, and, while another adapter is
//! starved, adapters whose turn (`--adapter-cycle-time`) is spent. When the request that comes
//! first does not fit the token budgets, the batch ends there (FIFO, as in TGI).

use std::collections::HashSet;
use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;

use super::registry::{Priority, Registry};
use super::scheduler::AdapterLease;
use crate::error::InferError;
use crate::infer::{AdapterKey, InferStreamResponse, ValidGenerateRequest};

/// A request with the channel its events go to.
pub(crate) struct Entry {
    /// The validated request.
    pub request: ValidGenerateRequest,
    /// Where its events go; closed when the client went away.
    pub response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    /// When it was queued.
    pub queued: Instant,
    /// When its prefill started.
    pub batch_time: Option<Instant>,
    /// Pins its adapter while it runs (None for the base model and while queued).
    pub lease: Option<AdapterLease>,
}

impl Entry {
    /// A queued entry.
    pub fn new(
        request: ValidGenerateRequest,
        response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    ) -> Self {
        Self {
            request,
            response_tx,
            queued: Instant::now(),
            batch_time: None,
            lease: None,
        }
    }

    /// Tokens this request may hold in the KV cache.
    pub fn max_tokens(&self) -> u32 {
        self.request.input_length() + self.request.stopping_parameters.max_new_tokens
    }
}

/// Budgets for one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchBudget {
    /// Don't form a batch smaller than this (None = any size).
    pub min_size: Option<usize>,
    /// Don't form a batch larger than this.
    pub max_size: Option<usize>,
    /// Sum of prompt tokens of the batch.
    pub prefill_tokens: u32,
    /// Sum of prompt + max new tokens of the batch.
    pub total_tokens: u32,
}

/// A request taken for the next batch.
pub(crate) struct Taken {
    /// Request id.
    pub id: u64,
    /// The request.
    pub entry: Entry,
    /// Its adapter and slot (None for the base model).
    pub adapter: Option<(AdapterKey, u32)>,
}

/// Takes the requests of the next batch out of their queues and marks their adapters running;
/// empty when no batch can be formed. Requests whose client is gone are dropped on the way.
pub(crate) fn take_batch(reg: &mut Registry, budget: BatchBudget, now: Instant) -> Vec<Taken> {
    reg.prune_cancelled();
    let mut in_batch: HashSet<AdapterKey> = reg
        .adapters
        .iter()
        .filter(|(_, a)| a.running > 0)
        .map(|(k, _)| *k)
        .collect();
    let starved = reg.starved(in_batch.len());
    let (cap, cycle) = (reg.cfg.max_active_adapters, reg.cfg.cycle_time);
    let mut taken: Vec<Taken> = Vec::new();
    let (mut prefill, mut total) = (0u32, 0u32);
    loop {
        if budget.max_size.is_some_and(|m| taken.len() >= m) {
            break;
        }
        let mut best: Option<(Priority, Option<(AdapterKey, u32)>)> =
            reg.base.front().map(|(id, _)| (Priority::Fresh(*id), None));
        for (key, a) in &reg.adapters {
            let (Some(slot), Some(priority)) = (a.resident_slot(), a.priority(cycle, now)) else {
                continue;
            };
            if !in_batch.contains(key) && in_batch.len() >= cap {
                continue;
            }
            if starved && a.over_cycle(cycle, now) {
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| priority < *b) {
                best = Some((priority, Some((*key, slot))));
            }
        }
        let Some((_, adapter)) = best else {
            break;
        };
        let Some(queue) = (match adapter {
            None => Some(&mut reg.base),
            Some((key, _)) => reg.adapters.get_mut(&key).map(|a| &mut a.queue),
        }) else {
            break;
        };
        let Some((id, entry)) = queue.pop_front() else {
            break;
        };
        let input = entry.request.input_length();
        let max = entry.max_tokens();
        if prefill.saturating_add(input) > budget.prefill_tokens
            || total.saturating_add(max) > budget.total_tokens
        {
            queue.push_front((id, entry));
            break;
        }
        prefill += input;
        total += max;
        if let Some((key, _)) = adapter {
            in_batch.insert(key);
        }
        taken.push(Taken { id, entry, adapter });
    }
    if taken.is_empty() || budget.min_size.is_some_and(|m| taken.len() < m) {
        for t in taken.into_iter().rev() {
            let queue = match t.adapter {
                None => Some(&mut reg.base),
                Some((key, _)) => reg.adapters.get_mut(&key).map(|a| &mut a.queue),
            };
            if let Some(q) = queue {
                q.push_front((t.id, t.entry));
            }
        }
        return Vec::new();
    }
    for t in &taken {
        if let Some((key, _)) = &t.adapter {
            reg.mark_running(key, now);
        }
    }
    taken
}

/// The shard's view of a request running on adapter `slot` (0 = base model).
pub(crate) fn to_proto_request(id: u64, r: &ValidGenerateRequest, slot: u32) -> pb::Request {
    let p = &r.parameters;
    let s = &r.stopping_parameters;
    pb::Request {
        id,
        input_ids: r.input_ids.clone(),
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: s.max_new_tokens,
            stop_sequences: s.stop_sequences.clone(),
            ignore_eos_token: s.ignore_eos_token,
        }),
        prefill_logprobs: r.decoder_input_details,
        top_n_tokens: r.top_n_tokens,
        adapter_slot: slot,
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
