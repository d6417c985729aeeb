//! Per-adapter queues and adapter residency: which adapter (or merge) lives in which shard slot,
//! the bytes it holds, who uses it, and what happened when it was loaded. The registry is the
//! one owner of this state: everything else (the batch builder, the loader, leases) changes it
//! through the methods below.
//!
//! States of an adapter key:
//!
//! ```text
//!            enqueue           plan: staging room          PrepareAdapter ok (bytes)
//! (absent) ─────────▶ Waiting ───────────────────▶ Preparing ─────────────────────────▶ Prepared
//!                      ▲  ▲                          │ failure                         │ plan: slot +
//!                      │  │ (rotation: queue kept)   ▼                                 │ bytes found
//!                      │  └──────── Resident ◀── Installing ◀──────────────────────────┘
//!                      │ new request   │ LRU                 (no slot or bytes yet: skipped,
//!                      └── Evicted ◀───┘                      others keep being served)
//!                          Errored (TTL) ◀── any failure
//! ```
//!
//! The base model is not tracked here: it has its own queue and is always ready (slot 0).
//!
//! Byte budget: the router owns it. A prepared adapter's size is what the shards reported for
//! it; an install reserves exactly that, after evicting idle adapters (LRU) as needed, so the
//! shards never see an install that does not fit (they refuse one as a router bug). Prepared
//! and in-flight adapters count against `max_concurrent_loads`, which bounds what the shards
//! hold staged outside the budget.
//!
//! Pinning: an adapter with running requests is never evicted. An adapter with queued requests
//! is not evicted either, with one exception that keeps slots fair: once it has been active for
//! `cycle_time`, it may be rotated out (its queue kept) in favour of a prepared adapter that
//! could not get a slot or bytes. Idle adapters stay resident as a cache and are evicted LRU
//! only when another adapter needs their slot or bytes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

mod admin;
mod plan;
mod take;

use admin::Preload;

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
    /// Adapters being prepared, prepared or being installed at once (merges are CPU-heavy, and
    /// staged adapters hold shard memory outside the budget).
    pub max_concurrent_loads: usize,
    /// How long a failed load answers new requests with its error before it is retried.
    pub error_ttl: Duration,
    /// Records of evicted adapters (kept for their size) beyond which they are forgotten.
    pub max_tracked: usize,
}

/// Where an adapter is.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    /// Not on the shards; its queued requests wait for a prepare.
    Waiting,
    /// The shards are reading (and merging) it into staging area `id`.
    Preparing {
        /// Staging id.
        id: u64,
    },
    /// Staged on the shards as `id`, `bytes` large; waits for a slot and room in the budget.
    Prepared {
        /// Staging id.
        id: u64,
        /// Its size in a slot (largest over the ranks).
        bytes: u64,
    },
    /// Being moved from staging into `slot`, with `bytes` reserved.
    Installing {
        /// Target slot.
        slot: u32,
        /// Bytes reserved.
        bytes: u64,
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

impl Status {
    /// Holds shard staging memory or a load in flight.
    fn is_staged(&self) -> bool {
        matches!(
            self,
            Status::Preparing { .. } | Status::Prepared { .. } | Status::Installing { .. }
        )
    }
}

/// One adapter key: its spec, queue, residency and use.
pub(crate) struct Adapter {
    spec: AdapterSpec,
    status: Status,
    /// Waiting requests, oldest first, with their ids.
    queue: VecDeque<(u64, Entry)>,
    /// Requests in the running batch (pins the adapter).
    running: usize,
    /// Last time a request started or finished on it.
    last_used: Instant,
    /// When its current turn started: set when it joins the running batch without a turn (or
    /// with a spent one), kept while it has requests running or queued, cleared when idle.
    active_since: Option<Instant>,
    /// Requests ran on it since it was last loaded (a freshly loaded adapter is never rotated
    /// out before it served anything).
    served_since_load: bool,
    /// Bytes of its last prepare (an adapter known to exceed the budget is failed at once).
    known_bytes: Option<u64>,
    /// The last plan found no slot or bytes for it.
    blocked: bool,
    /// Never evicted while resident (an operator's preload with `pinned`).
    pinned: bool,
    /// An operator asked for it to be loaded: it is wanted like a queued request until it is
    /// resident or its load fails.
    preload: Option<Preload>,
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
            blocked: false,
            pinned: false,
            preload: None,
        }
    }

    /// The slot of a resident adapter.
    fn resident_slot(&self) -> Option<u32> {
        match self.status {
            Status::Resident { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// The span the loader's calls for it go under: its first waiting request's (none when
    /// only a preload waits).
    fn trace_parent(&self) -> tracing::Span {
        self.queue
            .front()
            .map_or_else(tracing::Span::none, |(_, e)| e.trace.loader_parent())
    }

    /// Id of its oldest queued request, or of a pending preload if older.
    fn head(&self) -> Option<u64> {
        let queued = self.queue.front().map(|(id, _)| *id);
        let preload = self.preload.as_ref().map(|p| p.order);
        queued.into_iter().chain(preload).min()
    }

    /// Requests are queued for it or a preload waits for it.
    fn wanted(&self) -> bool {
        !self.queue.is_empty() || self.preload.is_some()
    }

    /// Its turn (started at `active_since`) lasted at least `cycle` at `now`.
    fn over_cycle(&self, cycle: Duration, now: Instant) -> bool {
        self.active_since
            .is_some_and(|t| now.saturating_duration_since(t) >= cycle)
    }

    /// Its place in line (`None` with an empty queue): see [`Priority`].
    fn priority(&self, cycle: Duration, now: Instant) -> Option<Priority> {
        let head = self.head()?;
        Some(match self.active_since {
            Some(t) if self.over_cycle(cycle, now) => Priority::Spent(t, head),
            _ => Priority::Fresh(head),
        })
    }

    fn idle(&self) -> bool {
        self.running == 0 && !self.wanted()
    }

    /// Fails its queued requests with `error`: remembered for `ttl` when given, else forgotten
    /// at once (the next request tries again).
    fn fail(
        &mut self,
        error: InferError,
        ttl: Option<(Instant, Duration)>,
    ) -> (InferError, Vec<Entry>) {
        self.status = match ttl {
            Some((now, ttl)) => Status::Errored {
                error: error.clone(),
                until: now + ttl,
            },
            None => Status::Evicted,
        };
        self.active_since = None;
        self.blocked = false;
        self.pinned = false;
        if let Some(preload) = self.preload.take() {
            preload.finish(Err(error.clone()));
        }
        let entries = self.queue.drain(..).map(|(_, e)| e).collect();
        (error, entries)
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
    /// Shard calls to start.
    pub jobs: Vec<Job>,
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

/// A shard call the loader should run; its outcome goes back through [`Registry::prepared`],
/// [`Registry::installed`] or [`Registry::job_failed`].
#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// Read (and merge) `spec` on the shards, staged as `id`.
    Prepare {
        /// The adapter.
        key: AdapterKey,
        /// Staging id.
        id: u64,
        /// What to load.
        spec: AdapterSpec,
        /// The span of the first request waiting for it (none for a preload).
        trace: tracing::Span,
    },
    /// Offload `offload` (evicted adapters), then install staged `id` into `slot`; `free_after`
    /// are evicted slots not reused, returned to the free list once offloaded.
    Install {
        /// The adapter.
        key: AdapterKey,
        /// Staging id.
        id: u64,
        /// Target slot.
        slot: u32,
        /// Slots of evicted adapters to free on the shards first.
        offload: Vec<u32>,
        /// Evicted slots not reused by this install.
        free_after: Vec<u32>,
        /// What it is (for logs).
        spec: AdapterSpec,
        /// The span of the first request waiting for it (none for a preload).
        trace: tracing::Span,
    },
    /// Drop staged `id`: nobody waits for it any more, or it can never fit.
    Discard {
        /// Staging id.
        id: u64,
    },
    /// Free the slots of unloaded adapters on the shards; they return to the free list through
    /// [`Registry::free_slots`] once offloaded.
    Offload {
        /// The slots.
        slots: Vec<u32>,
    },
}

/// A failed shard call, mapped to the error its requests receive; `cache` says whether new
/// requests get it too until the TTL expires.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The requests' error.
    pub error: InferError,
    /// Remember the failure for `error_ttl`.
    pub cache: bool,
}

/// Per-adapter queues, the base model's queue, slots and bytes.
pub(crate) struct Registry {
    cfg: RegistryConfig,
    adapters: HashMap<AdapterKey, Adapter>,
    base: VecDeque<(u64, Entry)>,
    free_slots: BTreeSet<u32>,
    /// Bytes resident plus bytes reserved by installs in flight.
    used_bytes: u64,
    next_stage_id: u64,
    /// Slots of unloaded adapters the shards have not freed yet (the next plan offloads them).
    unloaded: Vec<u32>,
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
            next_stage_id: 1,
            unloaded: Vec::new(),
        }
    }

    /// Queues a request (`id` orders requests across queues). A request for an adapter whose
    /// load failed less than `error_ttl` ago gets that error back.
    pub fn enqueue(
        &mut self,
        id: u64,
        mut entry: Entry,
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
                crate::error::ValidationError::AdaptersDisabled,
            ));
        }
        let adapter = self
            .adapters
            .entry(key)
            .or_insert_with(|| Adapter::new(spec.clone(), now));
        let kind = match &adapter.status {
            Status::Resident { .. } => Enqueued::Ready,
            s if s.is_staged() => Enqueued::Pending,
            Status::Waiting if adapter.wanted() => Enqueued::Pending,
            Status::Errored { error, until } if now < *until => return Err(error.clone()),
            _ => {
                adapter.status = Status::Waiting;
                Enqueued::Miss
            }
        };
        if kind != Enqueued::Ready {
            entry
                .trace
                .adapter_wait(adapter.spec.kind(), kind == Enqueued::Miss);
        }
        adapter.queue.push_back((id, entry));
        Ok(kind)
    }

    /// Drops queued requests whose client went away.
    pub fn prune_cancelled(&mut self) {
        self.base.retain(|(_, e)| !e.response_tx.is_closed());
        for a in self.adapters.values_mut() {
            a.queue.retain(|(_, e)| !e.response_tx.is_closed());
            if a.idle() {
                a.active_since = None;
            }
        }
    }

    /// Takes every queued request out (base model included), e.g. to fail them when the shards
    /// are gone.
    pub fn drain_queued(&mut self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self.base.drain(..).map(|(_, e)| e).collect();
        for a in self.adapters.values_mut() {
            entries.extend(a.queue.drain(..).map(|(_, e)| e));
            if a.idle() {
                a.active_since = None;
            }
        }
        entries
    }

    /// Number of queued requests (base model included).
    pub fn queued(&self) -> usize {
        self.base.len() + self.adapters.values().map(|a| a.queue.len()).sum::<usize>()
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

    /// True when some adapter with queued requests cannot run: prepared but no slot or bytes
    /// for it, or resident while the running batch already holds `max_active_adapters` other
    /// adapters. `in_batch` is the number of distinct adapters in the running batch.
    fn starved(&self, in_batch: usize) -> bool {
        self.adapters.values().any(|a| {
            !a.queue.is_empty()
                && match a.status {
                    Status::Prepared { .. } => a.blocked,
                    Status::Resident { .. } => {
                        a.running == 0 && in_batch >= self.cfg.max_active_adapters
                    }
                    _ => false,
                }
        })
    }

    /// True when the last plan left a prepared adapter without a slot or bytes (turns expire
    /// with time, so the loader plans again soon).
    pub fn any_blocked(&self) -> bool {
        self.adapters.values().any(|a| a.blocked)
    }

    /// Returns offloaded slots to the free list.
    pub fn free_slots(&mut self, slots: &[u32]) {
        self.free_slots
            .extend(slots.iter().copied().filter(|s| *s > 0));
    }

    /// A prepare finished: the adapter is staged as `id`, `bytes` large in a slot. False when
    /// nothing waits for that staging id (the caller discards it).
    pub fn prepared(&mut self, key: &AdapterKey, id: u64, bytes: u64) -> bool {
        match self.adapters.get_mut(key) {
            Some(a) if matches!(a.status, Status::Preparing { id: i } if i == id) => {
                a.status = Status::Prepared { id, bytes };
                a.known_bytes = Some(bytes);
                true
            }
            _ => {
                tracing::warn!(adapter = %key, id, "a prepare finished for an adapter that no longer waits for it");
                false
            }
        }
    }

    /// An install finished: the adapter is resident with `bytes` (what it reserved, unless the
    /// shards disagree).
    pub fn installed(&mut self, key: &AdapterKey, bytes: u64, now: Instant) {
        let Some(a) = self.adapters.get_mut(key) else {
            return;
        };
        let Status::Installing {
            slot,
            bytes: reserved,
            ..
        } = a.status
        else {
            return;
        };
        if bytes != reserved {
            tracing::warn!(adapter = %key, reserved, bytes, "the shards installed a different size than they prepared");
        }
        self.used_bytes = self.used_bytes.saturating_sub(reserved) + bytes;
        a.status = Status::Resident { slot, bytes };
        a.known_bytes = Some(bytes);
        a.last_used = now;
        for (_, entry) in &mut a.queue {
            entry.trace.adapter_ready();
        }
        if let Some(preload) = a.preload.take() {
            preload.finish(Ok(()));
        }
        // A turn spent before a rotation is over: the next one starts when it is served.
        a.active_since = None;
        self.record_residency();
    }

    /// A prepare or install failed: the adapter's reservation is returned and its queued
    /// requests are returned with the error to send them.
    pub fn job_failed(
        &mut self,
        key: &AdapterKey,
        failure: Failure,
        now: Instant,
    ) -> Option<(InferError, Vec<Entry>)> {
        let a = self.adapters.get_mut(key)?;
        match a.status {
            Status::Preparing { .. } | Status::Prepared { .. } => {}
            Status::Installing { slot, bytes, .. } => {
                self.used_bytes = self.used_bytes.saturating_sub(bytes);
                self.free_slots.insert(slot);
            }
            _ => return None,
        }
        let ttl = failure.cache.then_some((now, self.cfg.error_ttl));
        Some(a.fail(failure.error, ttl))
    }

    /// Adapters preparing, prepared or installing (what the shards hold staged or in flight).
    fn staged(&self) -> usize {
        self.adapters
            .values()
            .filter(|a| a.status.is_staged())
            .count()
    }

    /// Forgets evicted or expired records once there are more than `max_tracked`.
    fn forget_old(&mut self, now: Instant) {
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

    fn record_residency(&self) {
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
mod take_tests;
#[cfg(test)]
mod tests;
