//! The scheduler shared by the batching loop and the adapter loader: the [`Registry`] (queues
//! and adapter residency) behind one lock, the wake-ups of both tasks, leases that pin an
//! adapter while its requests run, and the loader task that prepares adapters, computes merges
//! and installs them concurrently with the batching loop.
//!
//! Why a lock and not a queue actor (TGI's choice): every registry operation is short,
//! synchronous and allocation-light; the lock keeps it so (no task hop, no reply channel per
//! request), a lease can release its pin synchronously in `Drop`, and the registry stays a plain
//! struct whose methods are unit-tested without a runtime. The lock is never held across an
//! await: shard calls run outside it, and their outcomes come back through registry methods.
//!
//! Single flight: a key has one record; the first request for it starts one prepare, later ones
//! wait in its queue, so N concurrent identical merges make one `PrepareAdapter` call.
//!
//! The loader task and what it does with the shards' answers are in [`loader`].

mod loader;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, oneshot};

use super::adapters::{AdapterView, AdminError, Residency};
use super::queue::{BatchBudget, Entry, to_proto_request};
use super::registry::{self, Enqueued, Registry, RegistryConfig};
use crate::error::InferError;
use crate::infer::{AdapterKey, AdapterSpec, InferStreamResponse, ValidGenerateRequest};

pub(crate) use loader::loader_task;

struct State {
    registry: Registry,
    next_id: u64,
    next_batch_id: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the batching loop (a request can run).
    batch: Notify,
    /// Wakes the loader (a load may be possible).
    loader: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pins an adapter while one of its requests is in the running batch; dropping it (request
/// finished, cancelled or failed) unpins and wakes the loader.
pub(crate) struct AdapterLease {
    key: AdapterKey,
    shared: Arc<Shared>,
}

impl Drop for AdapterLease {
    fn drop(&mut self) {
        self.shared
            .lock()
            .registry
            .release(&self.key, Instant::now());
        self.shared.loader.notify_one();
    }
}

/// A batch ready for prefill.
pub(crate) struct NextBatch {
    /// Its entries by request id.
    pub entries: HashMap<u64, Entry>,
    /// The wire batch.
    pub batch: pb::Batch,
}

/// Handle to the queues and adapter residency. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(cfg: RegistryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    registry: Registry::new(cfg),
                    next_id: 0,
                    next_batch_id: 0,
                }),
                batch: Notify::new(),
                loader: Notify::new(),
            }),
        }
    }

    /// Queues a request. Fails at once when its adapter failed to load moments ago (the cached
    /// error) or adapters are disabled.
    pub fn append(
        &self,
        request: ValidGenerateRequest,
        response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    ) -> Result<(), InferError> {
        let spec = &request.adapter;
        let (is_base, kind) = (spec.is_base(), spec.kind());
        let key = if is_base {
            AdapterKey::base()
        } else {
            spec.key()
        };
        let enqueued = {
            let mut s = self.shared.lock();
            let id = s.next_id;
            s.next_id += 1;
            let enqueued =
                s.registry
                    .enqueue(id, Entry::new(request, response_tx), key, Instant::now())?;
            metrics::gauge!(crate::metrics::REQUESTS_WAITING).set(s.registry.queued() as f64);
            enqueued
        };
        if !is_base {
            let name = if enqueued == Enqueued::Miss {
                registry::names::MISSES
            } else {
                registry::names::HITS
            };
            metrics::counter!(name, "kind" => kind).increment(1);
        }
        match enqueued {
            Enqueued::Ready => self.shared.batch.notify_one(),
            Enqueued::Pending | Enqueued::Miss => self.shared.loader.notify_one(),
        }
        Ok(())
    }

    /// Requests waiting in the queues.
    pub fn queued(&self) -> usize {
        self.shared.lock().registry.queued()
    }

    /// Takes the next batch within `budget` (see [`take_batch`]).
    pub fn next_batch(&self, budget: BatchBudget) -> Option<NextBatch> {
        let now = Instant::now();
        let (taken, batch_id) = {
            let mut s = self.shared.lock();
            let taken = s.registry.take_batch(budget, now);
            metrics::gauge!(crate::metrics::REQUESTS_WAITING).set(s.registry.queued() as f64);
            if taken.is_empty() {
                return None;
            }
            let id = s.next_batch_id;
            s.next_batch_id += 1;
            (taken, id)
        };
        let mut requests = Vec::with_capacity(taken.len());
        let mut entries = HashMap::with_capacity(taken.len());
        let mut max_tokens = 0u32;
        for t in taken {
            let mut entry = t.entry;
            let slot = t.adapter.map_or(0, |(_, slot)| slot);
            requests.push(to_proto_request(t.id, &entry.request, slot));
            max_tokens += entry.max_tokens();
            entry.batch_time = Some(now);
            entry.lease = t.adapter.map(|(key, _)| AdapterLease {
                key,
                shared: Arc::clone(&self.shared),
            });
            entries.insert(t.id, entry);
        }
        Some(NextBatch {
            batch: pb::Batch {
                id: batch_id,
                size: requests.len() as u32,
                max_tokens,
                requests,
            },
            entries,
        })
    }

    /// Asks for `spec` to be loaded (and pinned); the receiver answers once it is resident
    /// or its load failed.
    pub fn preload(
        &self,
        spec: AdapterSpec,
        pinned: bool,
    ) -> Result<(AdapterKey, oneshot::Receiver<Result<(), InferError>>), AdminError> {
        let key = spec.key();
        let (tx, rx) = oneshot::channel();
        let enqueued = {
            let mut s = self.shared.lock();
            let id = s.next_id;
            s.next_id += 1;
            s.registry
                .preload(key, spec, pinned, id, tx, Instant::now())?
        };
        if enqueued != Enqueued::Ready {
            self.shared.loader.notify_one();
        }
        Ok((key, rx))
    }

    /// Unloads `key` (see [`Registry::unload`]).
    pub fn unload(&self, key: &AdapterKey) -> Result<AdapterView, AdminError> {
        let view = self.shared.lock().registry.unload(key, Instant::now())?;
        self.shared.loader.notify_one();
        Ok(view)
    }

    /// The tracked adapter whose full hex key starts with `prefix` (at least 8 digits).
    pub fn find(&self, prefix: &str) -> Result<AdapterKey, AdminError> {
        self.shared.lock().registry.find(prefix)
    }

    /// One tracked adapter.
    pub fn adapter(&self, key: &AdapterKey) -> Option<AdapterView> {
        self.shared.lock().registry.adapter(key, Instant::now())
    }

    /// Every tracked adapter.
    pub fn residency(&self) -> Residency {
        self.shared.lock().registry.residency(Instant::now())
    }

    /// Fails every queued request and pending preload with `error`.
    pub fn fail_queued(&self, error: &InferError) {
        let entries = {
            let mut s = self.shared.lock();
            s.registry.fail_preloads(error);
            let entries = s.registry.drain_queued();
            metrics::gauge!(crate::metrics::REQUESTS_WAITING).set(0.0);
            entries
        };
        fail_entries(error, entries);
    }

    /// Waits until a request may be able to run.
    pub async fn wait_for_work(&self) {
        self.shared.batch.notified().await;
    }
}

fn fail_entries(error: &InferError, entries: Vec<Entry>) {
    for e in entries {
        e.trace.failed(error);
        let _ = e.response_tx.send(Err(error.clone()));
    }
}
