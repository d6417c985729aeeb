//! Planning shard calls: prepared adapters that get a slot and bytes now (evicting resident
//! adapters for them: LRU among idle ones first, then rotation of adapters whose turn is
//! spent), waiting adapters that start preparing, and staged adapters nobody wants any more.

use std::time::Instant;

use super::{Entry, Job, Plan, Priority, Registry, Status, names};

/// Why an adapter leaves its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Eviction {
    /// The planner needs its slot or bytes (LRU, or rotation when requests wait for it).
    Planned,
    /// An operator unloaded it.
    Unload,
}
use crate::error::InferError;
use crate::infer::AdapterKey;

impl Registry {
    /// Chooses the next shard calls:
    ///
    /// 1. staged adapters whose requests all went away are discarded;
    /// 2. prepared adapters, in [`Priority`] order, are installed when a slot (free or evicted)
    ///    and room in the byte budget exist for their reported size — one that does not fit is
    ///    skipped, not waited for, so the ones behind it may fit; one larger than the whole
    ///    budget fails;
    /// 3. waiting adapters, in [`Priority`] order, start preparing while fewer than
    ///    `max_concurrent_loads` are staged.
    pub fn plan(&mut self, now: Instant) -> Plan {
        self.prune_cancelled();
        let mut plan = Plan::default();
        if !self.unloaded.is_empty() {
            plan.jobs.push(Job::Offload {
                slots: std::mem::take(&mut self.unloaded),
            });
        }
        self.drop_unwanted(&mut plan);
        for key in self.in_line(now, |s| matches!(s, Status::Prepared { .. })) {
            if let Some(failed) = self.fail_if_too_big(&key, &mut plan, now) {
                plan.failed.push(failed);
                continue;
            }
            let job = self
                .choose_victims(&key, now)
                .and_then(|victims| self.start_install(key, victims, now));
            match job {
                Some(job) => plan.jobs.push(job),
                None => {
                    if let Some(a) = self.adapters.get_mut(&key) {
                        a.blocked = true;
                    }
                }
            }
        }
        let mut staged = self.staged();
        for key in self.in_line(now, |s| matches!(s, Status::Waiting)) {
            if staged >= self.cfg.max_concurrent_loads {
                break;
            }
            if let Some(failed) = self.fail_if_too_big(&key, &mut plan, now) {
                plan.failed.push(failed);
                continue;
            }
            if let Some(job) = self.start_prepare(key) {
                plan.jobs.push(job);
                staged += 1;
            }
        }
        self.forget_old(now);
        plan
    }

    /// Waiting adapters without requests are evicted; prepared ones are discarded too.
    fn drop_unwanted(&mut self, plan: &mut Plan) {
        for a in self.adapters.values_mut() {
            if a.wanted() {
                continue;
            }
            match a.status {
                Status::Waiting => {}
                Status::Prepared { id, .. } => plan.jobs.push(Job::Discard { id }),
                _ => continue,
            }
            a.status = Status::Evicted;
            a.blocked = false;
        }
    }

    /// Keys whose status matches, with queued requests, in [`Priority`] order.
    fn in_line(&self, now: Instant, status: impl Fn(&Status) -> bool) -> Vec<AdapterKey> {
        let cycle = self.cfg.cycle_time;
        let mut line: Vec<(Priority, AdapterKey)> = self
            .adapters
            .iter()
            .filter(|(_, a)| status(&a.status))
            .filter_map(|(k, a)| a.priority(cycle, now).map(|p| (p, *k)))
            .collect();
        line.sort_unstable();
        line.into_iter().map(|(_, k)| k).collect()
    }

    /// Fails an adapter whose size (reported by a prepare, now or earlier) exceeds the whole
    /// budget less what pinned adapters hold; a staged one is discarded.
    fn fail_if_too_big(
        &mut self,
        key: &AdapterKey,
        plan: &mut Plan,
        now: Instant,
    ) -> Option<(InferError, Vec<Entry>)> {
        let pinned = self.pinned_bytes(Some(key));
        let budget = self.cfg.budget_bytes.saturating_sub(pinned);
        let a = self.adapters.get_mut(key)?;
        let bytes = match a.status {
            Status::Prepared { bytes, .. } => bytes,
            _ => a.known_bytes?,
        };
        if bytes <= budget {
            return None;
        }
        if let Status::Prepared { id, .. } = a.status {
            plan.jobs.push(Job::Discard { id });
        }
        let pinned_note = if pinned > 0 {
            format!(" besides the {pinned} bytes of pinned adapters")
        } else {
            String::new()
        };
        let error = InferError::Generation(format!(
            "Server error: the adapter needs {bytes} bytes but the shards hold at most {budget} bytes of adapters{pinned_note} (--adapter-memory-budget)"
        ));
        Some(a.fail(error, Some((now, self.cfg.error_ttl))))
    }

    /// The adapters to evict so that prepared `key` gets a slot and its bytes; `None` when even
    /// evicting every evictable adapter is not enough.
    fn choose_victims(&self, key: &AdapterKey, now: Instant) -> Option<Vec<AdapterKey>> {
        let Status::Prepared { bytes: need, .. } = self.adapters.get(key)?.status else {
            return None;
        };
        let mut victims: Vec<AdapterKey> = Vec::new();
        let mut freed = 0u64;
        let mut slots = self.free_slots.len();
        loop {
            let free = self.cfg.budget_bytes.saturating_sub(self.used_bytes) + freed;
            if slots > 0 && free >= need {
                return Some(victims);
            }
            let (victim, bytes) = self.evictable(now, &victims)?;
            victims.push(victim);
            freed += bytes;
            slots += 1;
        }
    }

    /// The least recently used evictable adapter not in `exclude`: idle ones first, then
    /// adapters with queued requests that used up their cycle time (rotation).
    fn evictable(&self, now: Instant, exclude: &[AdapterKey]) -> Option<(AdapterKey, u64)> {
        let candidates = || {
            self.adapters.iter().filter_map(|(k, a)| match a.status {
                Status::Resident { bytes, .. }
                    if a.running == 0 && !a.pinned && !exclude.contains(k) =>
                {
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
                        !a.wanted()
                    }
                })
                .min_by_key(|(_, a, _)| a.last_used)
                .map(|(k, _, b)| (*k, b))
        };
        lru(false).or_else(|| lru(true))
    }

    fn start_prepare(&mut self, key: AdapterKey) -> Option<Job> {
        let a = self.adapters.get_mut(&key)?;
        let id = self.next_stage_id;
        self.next_stage_id += 1;
        a.status = Status::Preparing { id };
        a.blocked = false;
        Some(Job::Prepare {
            key,
            id,
            spec: a.spec.clone(),
            trace: a.trace_parent(),
        })
    }

    fn start_install(
        &mut self,
        key: AdapterKey,
        victims: Vec<AdapterKey>,
        now: Instant,
    ) -> Option<Job> {
        let Status::Prepared { id, bytes } = self.adapters.get(&key)?.status else {
            return None;
        };
        let mut offload = Vec::with_capacity(victims.len());
        for v in &victims {
            if let Some(slot) = self.evict(v, now, Eviction::Planned) {
                offload.push(slot);
            }
        }
        let (slot, free_after) = match self.free_slots.pop_first() {
            Some(s) => (s, offload.clone()),
            // A victim's slot: the loader offloads it before installing into it.
            None => {
                let (first, rest) = offload.split_first()?;
                (*first, rest.to_vec())
            }
        };
        let a = self.adapters.get_mut(&key)?;
        a.status = Status::Installing { slot, bytes };
        a.blocked = false;
        a.served_since_load = false;
        self.used_bytes += bytes;
        Some(Job::Install {
            key,
            id,
            slot,
            offload,
            free_after,
            spec: a.spec.clone(),
            trace: a.trace_parent(),
        })
    }

    /// Takes a resident adapter off its slot (its queue, if any, waits again); returns the slot,
    /// which stays reserved until the loader has offloaded it.
    pub(super) fn evict(&mut self, key: &AdapterKey, now: Instant, why: Eviction) -> Option<u32> {
        let cycle = self.cfg.cycle_time;
        let a = self.adapters.get_mut(key)?;
        let Status::Resident { slot, bytes } = a.status else {
            return None;
        };
        let rotation = !a.queue.is_empty();
        let reason = match why {
            Eviction::Unload => "unload",
            Eviction::Planned if rotation => "rotation",
            Eviction::Planned => "lru",
        };
        tracing::debug!(adapter = %key, slot, bytes, reason, "evicting adapter");
        metrics::counter!(names::EVICTIONS, "reason" => reason).increment(1);
        debug_assert!(
            a.running == 0,
            "adapters with running requests are never evicted"
        );
        debug_assert!(why == Eviction::Unload || !a.pinned);
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
