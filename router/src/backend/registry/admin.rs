//! Operator actions on the registry: preloads (an adapter wanted without a request, optionally
//! pinned so it is never evicted), unloads, and the residency snapshot the management API lists.
//!
//! A preload joins the same line as requests (ordered by the id it was given), so it is
//! prepared and installed by the ordinary plan; it ends when the adapter is resident or its load
//! fails. At most `max_slots - 1` adapters may be pinned: one slot always stays for the rest.
//! Pinned bytes are taken off the budget other adapters are checked against, so an adapter
//! that can never fit beside them fails at once instead of waiting forever.

use std::time::{Instant, SystemTime};

use tokio::sync::oneshot;

use super::plan::Eviction;
use super::{Adapter, Enqueued, Registry, Status};
use crate::backend::adapters::{AdapterState, AdapterView, AdminError, Residency, find_key};
use crate::error::{InferError, ValidationError};
use crate::infer::{AdapterKey, AdapterSpec};

/// Answers a preload: `Ok` once the adapter is resident, else the load's error.
pub(crate) type PreloadTx = oneshot::Sender<Result<(), InferError>>;

/// A pending preload of one adapter (several callers may wait for it).
pub(crate) struct Preload {
    /// Its place in line (ids are shared with requests).
    pub(super) order: u64,
    waiters: Vec<PreloadTx>,
}

impl Preload {
    /// Answers every waiter.
    pub(super) fn finish(self, result: Result<(), InferError>) {
        for w in self.waiters {
            let _ = w.send(result.clone());
        }
    }
}

impl Registry {
    /// Asks for `key` to be loaded (`pinned`: and never evicted), answering `tx` when it is
    /// resident or its load failed. Sets or clears the pin of an adapter already resident. A
    /// recent load failure is retried at once (an operator asked for it).
    pub fn preload(
        &mut self,
        key: AdapterKey,
        spec: AdapterSpec,
        pinned: bool,
        order: u64,
        tx: PreloadTx,
        now: Instant,
    ) -> Result<Enqueued, AdminError> {
        if self.cfg.max_slots == 0 {
            return Err(InferError::Validation(ValidationError::AdaptersDisabled).into());
        }
        let already = self.adapters.get(&key).is_some_and(|a| a.pinned);
        if pinned && !already {
            let count = self.adapters.values().filter(|a| a.pinned).count();
            if count + 1 >= self.cfg.max_slots as usize {
                return Err(AdminError::PinLimit {
                    pinned: count,
                    slots: self.cfg.max_slots,
                });
            }
        }
        let a = self
            .adapters
            .entry(key)
            .or_insert_with(|| Adapter::new(spec, now));
        a.pinned = pinned;
        let kind = match a.status {
            Status::Resident { .. } => {
                let _ = tx.send(Ok(()));
                return Ok(Enqueued::Ready);
            }
            ref s if s.is_staged() => Enqueued::Pending,
            Status::Waiting if a.wanted() => Enqueued::Pending,
            _ => {
                a.status = Status::Waiting;
                Enqueued::Miss
            }
        };
        match &mut a.preload {
            Some(p) => p.waiters.push(tx),
            None => {
                a.preload = Some(Preload {
                    order,
                    waiters: vec![tx],
                })
            }
        }
        Ok(kind)
    }

    /// Takes `key` off the shards (its slot is offloaded by the next plan) and unpins it; a
    /// record that is not resident is forgotten. Refused while requests run or wait on it or a
    /// load is in flight.
    pub fn unload(&mut self, key: &AdapterKey, now: Instant) -> Result<AdapterView, AdminError> {
        let a = self
            .adapters
            .get(key)
            .ok_or_else(|| AdminError::NotTracked(key.to_string()))?;
        if a.running > 0 || !a.queue.is_empty() {
            return Err(AdminError::InUse {
                key: key.to_string(),
                running: a.running,
                queued: a.queue.len(),
            });
        }
        if a.status.is_staged() || a.preload.is_some() {
            return Err(AdminError::Loading(key.to_string()));
        }
        if matches!(a.status, Status::Resident { .. }) {
            if let Some(slot) = self.evict(key, now, Eviction::Unload) {
                self.unloaded.push(slot);
            }
            let a = self.adapters.get_mut(key).expect("evicted above");
            a.pinned = false;
            Ok(Self::view(key, a, now))
        } else {
            let a = self.adapters.remove(key).expect("looked up above");
            let mut view = Self::view(key, &a, now);
            view.state = AdapterState::Evicted;
            Ok(view)
        }
    }

    /// The tracked adapter whose full hex key starts with `prefix` (see [`find_key`]).
    pub fn find(&self, prefix: &str) -> Result<AdapterKey, AdminError> {
        find_key(self.adapters.keys(), prefix)
    }

    /// Fails every pending preload with `error` (the shards are gone).
    pub fn fail_preloads(&mut self, error: &InferError) {
        for a in self.adapters.values_mut() {
            if let Some(p) = a.preload.take() {
                p.finish(Err(error.clone()));
            }
        }
    }

    /// The view of one tracked adapter.
    pub fn adapter(&self, key: &AdapterKey, now: Instant) -> Option<AdapterView> {
        self.adapters.get(key).map(|a| Self::view(key, a, now))
    }

    /// Every tracked adapter, resident ones first, then by key.
    pub fn residency(&self, now: Instant) -> Residency {
        let mut adapters: Vec<AdapterView> = self
            .adapters
            .iter()
            .map(|(k, a)| Self::view(k, a, now))
            .collect();
        adapters.sort_by_key(|v| (v.state != AdapterState::Resident, v.key.to_string()));
        Residency {
            adapters,
            max_slots: self.cfg.max_slots,
            used_slots: self.cfg.max_slots - self.free_slots.len() as u32,
            budget_bytes: (self.cfg.budget_bytes != u64::MAX).then_some(self.cfg.budget_bytes),
            used_bytes: self.used_bytes,
        }
    }

    /// Bytes of resident pinned adapters, but `except`.
    pub(super) fn pinned_bytes(&self, except: Option<&AdapterKey>) -> u64 {
        self.adapters
            .iter()
            .filter(|(k, a)| a.pinned && Some(*k) != except)
            .filter_map(|(_, a)| match a.status {
                Status::Resident { bytes, .. } => Some(bytes),
                _ => None,
            })
            .sum()
    }

    fn view(key: &AdapterKey, a: &Adapter, now: Instant) -> AdapterView {
        let (state, slot, bytes, error) = match &a.status {
            Status::Waiting => (AdapterState::Waiting, None, a.known_bytes, None),
            Status::Preparing { .. } => (AdapterState::Loading, None, a.known_bytes, None),
            Status::Prepared { bytes, .. } => (AdapterState::Loading, None, Some(*bytes), None),
            Status::Installing { slot, bytes } => {
                (AdapterState::Loading, Some(*slot), Some(*bytes), None)
            }
            Status::Resident { slot, bytes } => {
                (AdapterState::Resident, Some(*slot), Some(*bytes), None)
            }
            Status::Evicted => (AdapterState::Evicted, None, a.known_bytes, None),
            Status::Errored { error, until } if now < *until => (
                AdapterState::Failed,
                None,
                a.known_bytes,
                Some(error.to_string()),
            ),
            Status::Errored { .. } => (AdapterState::Evicted, None, a.known_bytes, None),
        };
        let idle = now.saturating_duration_since(a.last_used);
        AdapterView {
            key: *key,
            spec: a.spec.clone(),
            state,
            slot,
            bytes,
            pinned: a.pinned,
            running: a.running,
            queued: a.queue.len(),
            last_used: SystemTime::now()
                .checked_sub(idle)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            error,
        }
    }
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
