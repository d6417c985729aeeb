//! The batch builder: which waiting requests, across the base model's queue and the queues of
//! resident adapters, join the next prefill under the prefill-token, total-token and batch-size
//! budgets (TGI v3 policy) and the cap on distinct adapters per batch. The prefill-token budget
//! is what the next shard step has left for new prompts; the shards prefill prompts in chunks,
//! so requests join while any of it is left and the last one may overflow it (the shards
//! prefill the rest over the next steps, as vLLM's chunked prefill fills its token budget).
//!
//! Requests are taken one at a time from the queue whose head is the oldest request. Queues of
//! adapters that are not resident are skipped, not waited for; so are adapters that would
//! exceed `max_active_adapters`. While more adapters want to run than that cap allows, queues
//! are taken in [`Priority`] order instead (adapters whose turn, `--adapter-cycle-time`, is
//! spent after the others), and while one of them is starved, spent adapters are skipped.
//! Without that contention turns play no part: a queue whose adapter just started a turn must
//! not overtake older requests of adapters whose turn is spent (under a burst over 16
//! adapters, that held some requests back for 20 s). When the request that comes first does not fit the
//! total-token budget, or the step's prompt budget is used up, the batch ends there (FIFO, as in
//! TGI).

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use super::{Priority, Registry};
use crate::backend::queue::{BatchBudget, Entry};
use crate::infer::AdapterKey;

/// A request taken for the next batch.
pub(crate) struct Taken {
    /// Request id.
    pub id: u64,
    /// The request.
    pub entry: Entry,
    /// Its adapter and slot (None for the base model).
    pub adapter: Option<(AdapterKey, u32)>,
}

impl Registry {
    /// Takes the requests of the next batch out of their queues and marks their adapters
    /// running; empty when no batch can be formed. Requests whose client is gone are dropped on
    /// the way.
    pub fn take_batch(&mut self, budget: BatchBudget, now: Instant) -> Vec<Taken> {
        self.prune_cancelled();
        let mut in_batch: HashSet<AdapterKey> = self
            .adapters
            .iter()
            .filter(|(_, a)| a.running > 0)
            .map(|(k, _)| *k)
            .collect();
        let starved = self.starved(in_batch.len());
        let contended = self.contended();
        let mut taken: Vec<Taken> = Vec::new();
        let (mut prefill, mut total) = (0u32, 0u32);
        loop {
            if budget.max_size.is_some_and(|m| taken.len() >= m) {
                break;
            }
            let Some(adapter) = self.next_queue(&in_batch, contended, starved, now) else {
                break;
            };
            let Some(queue) = self.queue_mut(adapter) else {
                break;
            };
            let Some((id, entry)) = queue.pop_front() else {
                break;
            };
            let input = entry.request.input_length();
            let max = entry.max_tokens();
            // Joins while the step's prompt budget has room left; what does not fit this step
            // is prefilled in the next ones.
            if prefill >= budget.prefill_tokens || total.saturating_add(max) > budget.total_tokens {
                queue.push_front((id, entry));
                break;
            }
            prefill = prefill.saturating_add(input);
            total += max;
            if let Some((key, _)) = adapter {
                in_batch.insert(key);
            }
            taken.push(Taken { id, entry, adapter });
        }
        if taken.is_empty() || budget.min_size.is_some_and(|m| taken.len() < m) {
            for t in taken.into_iter().rev() {
                if let Some(q) = self.queue_mut(t.adapter) {
                    q.push_front((t.id, t.entry));
                }
            }
            return Vec::new();
        }
        for t in &taken {
            if let Some((key, _)) = &t.adapter {
                self.mark_running(key, now);
            }
        }
        taken
    }

    /// The queue whose head goes next: the base model's (`Some(None)`) or a resident adapter's
    /// (`Some(Some((key, slot)))`); `None` when no queue may give a request.
    fn next_queue(
        &self,
        in_batch: &HashSet<AdapterKey>,
        contended: bool,
        starved: bool,
        now: Instant,
    ) -> Option<Option<(AdapterKey, u32)>> {
        let (cap, cycle) = (self.cfg.max_active_adapters, self.cfg.cycle_time);
        let mut best: Option<(Priority, Option<(AdapterKey, u32)>)> = self
            .base
            .front()
            .map(|(id, _)| (Priority::Fresh(*id), None));
        for (key, a) in &self.adapters {
            // Turns only matter while more adapters want to run than may; otherwise every
            // queue can join, and the oldest request goes first whatever its adapter's turn.
            let priority = if contended {
                a.priority(cycle, now)
            } else {
                a.head().map(Priority::Fresh)
            };
            let (Some(slot), Some(priority)) = (a.resident_slot(), priority) else {
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
        best.map(|(_, adapter)| adapter)
    }

    /// Whether more adapters want to run (running, or resident with queued requests) than
    /// `max_active_adapters` allows at once: only then do turns order the queues.
    fn contended(&self) -> bool {
        let wanting = self
            .adapters
            .values()
            .filter(|a| a.running > 0 || (a.resident_slot().is_some() && !a.queue.is_empty()))
            .count();
        wanting > self.cfg.max_active_adapters
    }

    fn queue_mut(
        &mut self,
        adapter: Option<(AdapterKey, u32)>,
    ) -> Option<&mut VecDeque<(u64, Entry)>> {
        match adapter {
            None => Some(&mut self.base),
            Some((key, _)) => self.adapters.get_mut(&key).map(|a| &mut a.queue),
        }
    }

    /// A request on `key` joined the running batch. An adapter that had no turn, or whose turn
    /// is spent, starts a new one (a turn survives the batch draining between two requests).
    fn mark_running(&mut self, key: &AdapterKey, now: Instant) {
        let cycle = self.cfg.cycle_time;
        if let Some(a) = self.adapters.get_mut(key) {
            if a.running == 0 && (a.active_since.is_none() || a.over_cycle(cycle, now)) {
                a.active_since = Some(now);
            }
            a.running += 1;
            a.last_used = now;
            a.served_since_load = true;
        }
    }
}
