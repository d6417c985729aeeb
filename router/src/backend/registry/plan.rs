//! Planning loads: which waiting adapters get a slot and bytes now, and which resident
//! adapters are evicted for them (LRU among idle ones first, then rotation of adapters whose
//! turn is spent).

use std::time::Instant;

use super::{Entry, LoadJob, Plan, Priority, Registry, Status, names};
use crate::error::InferError;
use crate::infer::AdapterKey;

impl Registry {
    /// Chooses the next loads: waiting adapters in [`Priority`] order, each given a free slot
    /// (or an evicted one) and room in the byte budget. An adapter that does not fit is
    /// skipped, not waited for: the ones behind it may fit.
    pub fn plan(&mut self, now: Instant) -> Plan {
        self.prune_cancelled();
        let cycle = self.cfg.cycle_time;
        let mut waiting: Vec<(Priority, AdapterKey)> = Vec::new();
        for (key, a) in self.adapters.iter_mut() {
            if !matches!(a.status, Status::Waiting) {
                continue;
            }
            match a.priority(cycle, now) {
                Some(p) => waiting.push((p, *key)),
                None => {
                    a.status = Status::Evicted;
                    a.blocked = false;
                }
            }
        }
        waiting.sort_unstable();
        let mut plan = Plan::default();
        for (_, key) in waiting {
            if self.staging >= self.cfg.max_concurrent_loads {
                break;
            }
            if let Some(failed) = self.fail_if_too_big(&key, now) {
                plan.failed.push(failed);
                continue;
            }
            let job = self
                .choose_victims(&key, now)
                .and_then(|victims| self.start_load(key, victims, now));
            match job {
                Some(job) => plan.jobs.push(job),
                None => {
                    if let Some(a) = self.adapters.get_mut(&key) {
                        a.blocked = true;
                    }
                }
            }
        }
        self.forget_old(now);
        plan
    }

    /// Fails an adapter whose known size exceeds the whole budget.
    fn fail_if_too_big(
        &mut self,
        key: &AdapterKey,
        now: Instant,
    ) -> Option<(InferError, Vec<Entry>)> {
        let budget = self.cfg.budget_bytes;
        let bytes = self
            .adapters
            .get(key)?
            .known_bytes
            .filter(|b| *b > budget)?;
        let error = InferError::Generation(format!(
            "Server error: the adapter needs {bytes} bytes but the shards hold at most {budget} bytes of adapters"
        ));
        let a = self.adapters.get_mut(key)?;
        a.status = Status::Errored {
            error: error.clone(),
            until: now + self.cfg.error_ttl,
        };
        a.active_since = None;
        let entries = a.queue.drain(..).map(|(_, e)| e).collect();
        Some((error, entries))
    }

    /// The adapters to evict so that `key` gets a slot and its known size; `None` when even
    /// evicting every evictable adapter is not enough.
    fn choose_victims(&self, key: &AdapterKey, now: Instant) -> Option<Vec<AdapterKey>> {
        let a = self.adapters.get(key)?;
        let need = a.known_bytes.unwrap_or(0);
        let mut must_evict = a.must_evict;
        let mut victims: Vec<AdapterKey> = Vec::new();
        let mut freed = 0u64;
        let mut slots = self.free_slots.len();
        loop {
            let free = self.cfg.budget_bytes.saturating_sub(self.used_bytes) + freed;
            if slots > 0 && free >= need && !must_evict {
                return Some(victims);
            }
            let (victim, bytes) = self.evictable(now, &victims)?;
            victims.push(victim);
            freed += bytes;
            slots += 1;
            must_evict = false;
        }
    }

    /// The least recently used evictable adapter not in `exclude`: idle ones first, then
    /// adapters with queued requests that used up their cycle time (rotation).
    fn evictable(&self, now: Instant, exclude: &[AdapterKey]) -> Option<(AdapterKey, u64)> {
        let candidates = || {
            self.adapters.iter().filter_map(|(k, a)| match a.status {
                Status::Resident { bytes, .. } if a.running == 0 && !exclude.contains(k) => {
                    Some((k, a, bytes))
                }
                _ => None,
            })
        };
        let lru = |rotation: bool| {
            candidates()
                .filter(|(_, a, _)| {
                    if rotation {
                        !a.queue.is_empty()
                            && a.served_since_load
                            && a.over_cycle(self.cfg.cycle_time, now)
                    } else {
                        a.queue.is_empty()
                    }
                })
                .min_by_key(|(_, a, _)| a.last_used)
                .map(|(k, _, b)| (*k, b))
        };
        lru(false).or_else(|| lru(true))
    }

    fn start_load(
        &mut self,
        key: AdapterKey,
        victims: Vec<AdapterKey>,
        now: Instant,
    ) -> Option<LoadJob> {
        if !self.adapters.contains_key(&key) {
            return None;
        }
        let mut offload = Vec::with_capacity(victims.len());
        for v in &victims {
            if let Some(slot) = self.evict(v, now) {
                offload.push(slot);
            }
        }
        let (slot, free_after) = match self.free_slots.pop_first() {
            Some(s) => (s, offload.clone()),
            // A victim's slot: the loader offloads it before loading into it.
            None => {
                let (first, rest) = offload.split_first()?;
                (*first, rest.to_vec())
            }
        };
        let a = self.adapters.get_mut(&key)?;
        let reserved = a.known_bytes.unwrap_or(0);
        a.status = Status::Staging { reserved };
        a.must_evict = false;
        a.blocked = false;
        a.served_since_load = false;
        self.used_bytes += reserved;
        self.staging += 1;
        Some(LoadJob {
            key,
            spec: a.spec.clone(),
            slot,
            offload,
            free_after,
        })
    }

    /// Takes a resident adapter off its slot (its queue, if any, waits again); returns the slot,
    /// which stays reserved until the loader has offloaded it.
    fn evict(&mut self, key: &AdapterKey, now: Instant) -> Option<u32> {
        let cycle = self.cfg.cycle_time;
        let a = self.adapters.get_mut(key)?;
        let Status::Resident { slot, bytes } = a.status else {
            return None;
        };
        let rotation = !a.queue.is_empty();
        tracing::debug!(adapter = %key, slot, bytes, rotation, "evicting adapter");
        metrics::counter!(names::EVICTIONS, "reason" => if rotation { "rotation" } else { "lru" })
            .increment(1);
        debug_assert!(a.running == 0, "pinned adapters are never evicted");
        debug_assert!(!rotation || a.over_cycle(cycle, now));
        // A rotated adapter keeps `active_since`: its spent turn orders it behind fresh ones.
        a.status = if rotation {
            Status::Waiting
        } else {
            a.active_since = None;
            Status::Evicted
        };
        self.used_bytes = self.used_bytes.saturating_sub(bytes);
        self.record_residency();
        Some(slot)
    }
}
