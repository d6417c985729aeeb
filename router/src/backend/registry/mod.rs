//! Per-adapter queues and adapter residency: which adapter (or merge) lives in which shard slot,
//! the bytes it holds, who uses it, and what happened when it was loaded.
//!
//! States of an adapter key:
//!
//! ```text
//!            enqueue            plan: slot + bytes found       LoadAdapter ok
//! (absent) ─────────▶ Waiting ─────────────────────────▶ Staging ─────────────▶ Resident
//!                      ▲  ▲  │ plan: no room → skipped      │ RESOURCE_EXHAUSTED      │
//!                      │  │  ▼ (others keep being served)   │ → Waiting + must evict  │ LRU or
//!                      │  └─────────────────────────────────┘                         │ rotation
//!                      │ new request                     other failure                ▼
//!                      └──────────────────── Evicted ◀──── Errored (TTL) ◀─── ... Evicted
//! ```
//!
//! The base model is not tracked here: it has its own queue and is always ready (slot 0).
//!
//! Pinning: an adapter with running requests is never evicted. An adapter with queued requests
//! is not evicted either, with one exception that keeps slots fair: once it has been active for
//! `cycle_time`, it may be rotated out (its queue kept) in favour of an adapter that could not
//! get a slot or bytes. Idle adapters stay resident as a cache and are evicted LRU only when
//! another adapter needs their slot or bytes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

mod plan;

use super::queue::Entry;
use crate::error::InferError;
use crate::infer::{AdapterKey, AdapterSpec};

/// Metric names of adapter residency.
pub(crate) mod names {
    /// Counter: requests whose adapter was resident, loading or already waiting to load.
    pub const HITS: &str = "medley_adapter_cache_hits";
    /// Counter: requests that started a load (or merge).
    pub const MISSES: &str = "medley_adapter_cache_misses";
    /// Counter: adapters evicted, labelled `reason = lru | rotation`.
    pub const EVICTIONS: &str = "medley_adapter_evictions";
    /// Gauge: bytes of adapter weights resident on the shards.
    pub const RESIDENT_BYTES: &str = "medley_adapter_resident_bytes";
    /// Gauge: number of resident adapters.
    pub const RESIDENT: &str = "medley_adapter_resident";
}

/// Limits of the registry.
#[derive(Debug, Clone)]
pub(crate) struct RegistryConfig {
    /// Adapter slots of the shards (slot 0, the base model, excluded); 0 disables adapters.
    pub max_slots: u32,
    /// Bytes of adapter weights the shards may hold (`u64::MAX` when they report no limit).
    pub budget_bytes: u64,
    /// Distinct adapters allowed in the running batch.
    pub max_active_adapters: usize,
    /// How long an adapter may be active before it yields to starved adapters.
    pub cycle_time: Duration,
    /// Loads and merges in flight at once.
    pub max_concurrent_loads: usize,
    /// How long a failed load answers new requests with its error before it is retried.
    pub error_ttl: Duration,
    /// Records of evicted adapters (kept for their size) beyond which they are forgotten.
    pub max_tracked: usize,
}

/// Where an adapter is.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    /// Needs a slot; its queued requests wait.
    Waiting,
    /// A load or merge is in flight, with `reserved` bytes set aside.
    Staging {
        /// Bytes reserved (its size when known from an earlier load, else 0).
        reserved: u64,
    },
    /// Loaded; requests may run on it.
    Resident {
        /// Its slot.
        slot: u32,
        /// Bytes it holds (largest over the ranks).
        bytes: u64,
    },
    /// Not on the shards and not wanted.
    Evicted,
    /// Its load failed; new requests get `error` until `until`.
    Errored {
        /// The error its requests received.
        error: InferError,
        /// When a new request may try again.
        until: Instant,
    },
}

/// One adapter key: its spec, queue, residency and use.
pub(crate) struct Adapter {
    /// What to load.
    pub spec: AdapterSpec,
    /// Where it is.
    pub status: Status,
    /// Waiting requests, oldest first, with their ids.
    pub queue: VecDeque<(u64, Entry)>,
    /// Requests in the running batch (pins the adapter).
    pub running: usize,
    /// Last time a request started or finished on it.
    pub last_used: Instant,
    /// When its current turn started: set when it joins the running batch without a turn (or
    /// with a spent one), kept while it has requests running or queued, cleared when idle.
    pub active_since: Option<Instant>,
    /// Requests ran on it since it was last loaded (a freshly loaded adapter is never rotated
    /// out before it served anything).
    pub served_since_load: bool,
    /// Bytes of its last successful load.
    pub known_bytes: Option<u64>,
    /// The shards said it did not fit: evict something before the next try.
    pub must_evict: bool,
    /// The last plan found no slot or bytes for it.
    pub blocked: bool,
}

impl Adapter {
    fn new(spec: AdapterSpec, now: Instant) -> Self {
        Self {
            spec,
            status: Status::Waiting,
            queue: VecDeque::new(),
            running: 0,
            last_used: now,
            active_since: None,
            served_since_load: false,
            known_bytes: None,
            must_evict: false,
            blocked: false,
        }
    }

    /// The slot of a resident adapter.
    pub fn resident_slot(&self) -> Option<u32> {
        match self.status {
            Status::Resident { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// Id of its oldest queued request.
    pub fn head(&self) -> Option<u64> {
        self.queue.front().map(|(id, _)| *id)
    }

    /// Its turn (started at `active_since`) lasted at least `cycle` at `now`.
    pub fn over_cycle(&self, cycle: Duration, now: Instant) -> bool {
        self.active_since
            .is_some_and(|t| now.saturating_duration_since(t) >= cycle)
    }

    /// Its place in line (`None` with an empty queue): see [`Priority`].
    pub fn priority(&self, cycle: Duration, now: Instant) -> Option<Priority> {
        let head = self.head()?;
        Some(match self.active_since {
            Some(t) if self.over_cycle(cycle, now) => Priority::Spent(t, head),
            _ => Priority::Fresh(head),
        })
    }

    fn idle(&self) -> bool {
        self.running == 0 && self.queue.is_empty()
    }
}

/// The order in which queues are served (smallest first): adapters inside their cycle time (or
/// never served) by their oldest request; then adapters whose turn is spent, the one whose turn
/// started longest ago first (round robin), then by oldest request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Priority {
    /// Within its cycle time: FIFO by the id of its oldest request.
    Fresh(u64),
    /// Its turn is spent: by the start of that turn, then by oldest request.
    Spent(Instant, u64),
}

/// What a planning round decided.
#[derive(Default)]
pub(crate) struct Plan {
    /// Loads to start.
    pub jobs: Vec<LoadJob>,
    /// Adapters that can never fit, with the requests to fail.
    pub failed: Vec<(InferError, Vec<Entry>)>,
}

/// How a request joined its adapter's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// The adapter is resident: the request can run now.
    Ready,
    /// A load is in flight or planned: the request waits for it.
    Pending,
    /// The request starts a load.
    Miss,
}

/// A load (or merge) the loader should run: offload `offload` first, then load `spec` into
/// `slot`; `free_after` are slots to return to the free list once that is done.
#[derive(Debug, Clone)]
pub(crate) struct LoadJob {
    /// The adapter.
    pub key: AdapterKey,
    /// What to load.
    pub spec: AdapterSpec,
    /// Target slot.
    pub slot: u32,
    /// Slots of evicted adapters to free on the shards first.
    pub offload: Vec<u32>,
    /// Evicted slots not reused by this load.
    pub free_after: Vec<u32>,
}

/// Why a load failed, as the shards reported it.
#[derive(Debug, Clone)]
pub(crate) enum LoadFailure {
    /// Not enough adapter memory left on a shard.
    NoRoom(String),
    /// Any other failure, already mapped to the error its requests receive; `cache` says
    /// whether new requests get it too until the TTL expires.
    Failed {
        /// The requests' error.
        error: InferError,
        /// Remember the failure for `error_ttl`.
        cache: bool,
    },
}

/// Per-adapter queues, the base model's queue, slots and bytes.
pub(crate) struct Registry {
    /// Limits.
    pub cfg: RegistryConfig,
    /// Every tracked adapter key.
    pub adapters: HashMap<AdapterKey, Adapter>,
    /// Requests on the base model.
    pub base: VecDeque<(u64, Entry)>,
    free_slots: BTreeSet<u32>,
    /// Bytes resident plus bytes reserved by loads in flight.
    used_bytes: u64,
    staging: usize,
}

impl Registry {
    /// An empty registry with slots `1..=cfg.max_slots` free.
    pub fn new(cfg: RegistryConfig) -> Self {
        Self {
            free_slots: (1..=cfg.max_slots).collect(),
            cfg,
            adapters: HashMap::new(),
            base: VecDeque::new(),
            used_bytes: 0,
            staging: 0,
        }
    }

    /// Queues a request (`id` orders requests across queues). A request for an adapter whose
    /// load failed less than `error_ttl` ago gets that error back.
    pub fn enqueue(
        &mut self,
        id: u64,
        entry: Entry,
        key: AdapterKey,
        now: Instant,
    ) -> Result<Enqueued, InferError> {
        let spec = &entry.request.adapter;
        if spec.is_base() {
            self.base.push_back((id, entry));
            return Ok(Enqueued::Ready);
        }
        if self.cfg.max_slots == 0 {
            return Err(InferError::Validation(
                crate::error::AdapterValidationError::AdaptersDisabled.into(),
            ));
        }
        let adapter = self
            .adapters
            .entry(key)
            .or_insert_with(|| Adapter::new(spec.clone(), now));
        let kind = match &adapter.status {
            Status::Resident { .. } => Enqueued::Ready,
            Status::Staging { .. } => Enqueued::Pending,
            Status::Waiting if !adapter.queue.is_empty() => Enqueued::Pending,
            Status::Errored { error, until } if now < *until => return Err(error.clone()),
            Status::Waiting | Status::Evicted | Status::Errored { .. } => {
                adapter.status = Status::Waiting;
                Enqueued::Miss
            }
        };
        adapter.queue.push_back((id, entry));
        Ok(kind)
    }

    /// Drops queued requests whose client went away.
    pub fn prune_cancelled(&mut self) {
        self.base.retain(|(_, e)| !e.response_tx.is_closed());
        for a in self.adapters.values_mut() {
            a.queue.retain(|(_, e)| !e.response_tx.is_closed());
            if a.running == 0 && a.queue.is_empty() {
                a.active_since = None;
            }
        }
    }

    /// Number of queued requests (base model included).
    pub fn queued(&self) -> usize {
        self.base.len() + self.adapters.values().map(|a| a.queue.len()).sum::<usize>()
    }

    /// A request on `key` joined the running batch. An adapter that had no turn, or whose turn
    /// is spent, starts a new one (a turn survives the batch draining between two requests).
    pub fn mark_running(&mut self, key: &AdapterKey, now: Instant) {
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

    /// A request on `key` left the running batch (finished, cancelled or failed).
    pub fn release(&mut self, key: &AdapterKey, now: Instant) {
        if let Some(a) = self.adapters.get_mut(key) {
            a.running = a.running.saturating_sub(1);
            a.last_used = now;
            if a.idle() {
                a.active_since = None;
            }
        }
    }

    /// True when some adapter with queued requests cannot run: no slot or bytes for it, or the
    /// running batch already holds `max_active_adapters` other adapters. `in_batch` is the
    /// number of distinct adapters in the running batch.
    pub fn starved(&self, in_batch: usize) -> bool {
        self.adapters.values().any(|a| {
            !a.queue.is_empty()
                && match a.status {
                    Status::Waiting => a.blocked,
                    Status::Resident { .. } => {
                        a.running == 0 && in_batch >= self.cfg.max_active_adapters
                    }
                    _ => false,
                }
        })
    }

    /// Returns offloaded slots to the free list.
    pub fn free_slots(&mut self, slots: &[u32]) {
        self.free_slots
            .extend(slots.iter().copied().filter(|s| *s > 0));
    }

    /// A load finished: the adapter is resident with `bytes`.
    pub fn loaded(&mut self, key: &AdapterKey, slot: u32, bytes: u64, now: Instant) {
        self.staging = self.staging.saturating_sub(1);
        let Some(a) = self.adapters.get_mut(key) else {
            self.free_slots.insert(slot);
            return;
        };
        if let Status::Staging { reserved, .. } = a.status {
            self.used_bytes = self.used_bytes.saturating_sub(reserved);
        }
        a.status = Status::Resident { slot, bytes };
        a.known_bytes = Some(bytes);
        a.last_used = now;
        // A turn spent before a rotation is over: the next one starts when it is served.
        a.active_since = None;
        self.used_bytes += bytes;
        self.record_residency();
    }

    /// A load failed. Returns the queued requests to fail with the returned error (none when
    /// the adapter only has to wait for room).
    pub fn load_failed(
        &mut self,
        key: &AdapterKey,
        slot: u32,
        failure: LoadFailure,
        now: Instant,
    ) -> Option<(InferError, Vec<Entry>)> {
        self.staging = self.staging.saturating_sub(1);
        self.free_slots.insert(slot);
        let others_hold_memory = self.adapters.iter().any(|(k, a)| {
            k != key && matches!(a.status, Status::Resident { .. } | Status::Staging { .. })
        });
        let a = self.adapters.get_mut(key)?;
        if let Status::Staging { reserved, .. } = a.status {
            self.used_bytes = self.used_bytes.saturating_sub(reserved);
        }
        let (error, cache) = match failure {
            LoadFailure::NoRoom(_) if others_hold_memory => {
                // Room may appear once others finish: wait, evicting before the next try.
                a.status = Status::Waiting;
                a.must_evict = true;
                return None;
            }
            LoadFailure::NoRoom(msg) => (
                InferError::Generation(format!(
                    "Server error: the adapter does not fit the shards' adapter memory: {msg}"
                )),
                true,
            ),
            LoadFailure::Failed { error, cache } => (error, cache),
        };
        a.status = if cache {
            Status::Errored {
                error: error.clone(),
                until: now + self.cfg.error_ttl,
            }
        } else {
            Status::Evicted
        };
        a.active_since = None;
        a.must_evict = false;
        let entries = a.queue.drain(..).map(|(_, e)| e).collect();
        Some((error, entries))
    }

    /// Forgets evicted or expired records once there are more than `max_tracked`.
    pub(super) fn forget_old(&mut self, now: Instant) {
        if self.adapters.len() <= self.cfg.max_tracked {
            return;
        }
        self.adapters.retain(|_, a| {
            !a.idle()
                || match &a.status {
                    Status::Evicted => false,
                    Status::Errored { until, .. } => now < *until,
                    _ => true,
                }
        });
    }

    /// Bytes resident or reserved.
    #[cfg(test)]
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Number of free slots.
    #[cfg(test)]
    pub fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }

    pub(super) fn record_residency(&self) {
        let (count, bytes) = self
            .adapters
            .values()
            .filter_map(|a| match a.status {
                Status::Resident { bytes, .. } => Some(bytes),
                _ => None,
            })
            .fold((0usize, 0u64), |(n, b), x| (n + 1, b + x));
        metrics::gauge!(names::RESIDENT).set(count as f64);
        metrics::gauge!(names::RESIDENT_BYTES).set(bytes as f64);
    }
}

#[cfg(test)]
mod tests;
