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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::adapters::{AdapterView, AdminError, Residency};
use super::client::ClientError;
use super::guarded::Guarded;
use super::queue::{BatchBudget, Entry, to_proto_request};
use super::registry::{self, Enqueued, Failure, Job, Registry, RegistryConfig};
use super::shard_api::ShardApi;
use crate::error::{InferError, ValidationError};
use crate::infer::{AdapterKey, AdapterSpec, InferStreamResponse, ValidGenerateRequest};

/// Metric names of the scheduler and the loader.
mod names {
    /// Histogram: seconds the shards spent reading adapter files, labelled `kind`.
    pub const LOAD: &str = "medley_adapter_load_duration";
    /// Histogram: seconds the shards spent merging.
    pub const MERGE: &str = "medley_adapter_merge_duration";
    /// Counter: failed loads, labelled `code` (the shard's gRPC code).
    pub const FAILURES: &str = "medley_adapter_load_failures";
}

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

    fn plan(&self) -> (Vec<Job>, bool) {
        let (plan, blocked) = {
            let mut s = self.shared.lock();
            let plan = s.registry.plan(Instant::now());
            (plan, s.registry.any_blocked())
        };
        for (error, entries) in plan.failed {
            fail_entries(&error, entries);
        }
        (plan.jobs, blocked)
    }

    /// Records the outcome of a shard call; returns a staging id to discard, if any.
    fn finish(&self, done: JobDone) -> Option<u64> {
        let now = Instant::now();
        let mut discard = None;
        let failed = {
            let mut s = self.shared.lock();
            match done {
                JobDone::Offloaded { slots } => {
                    s.registry.free_slots(&slots);
                    None
                }
                JobDone::Prepared {
                    key,
                    id,
                    spec,
                    result: Ok(resp),
                } => {
                    tracing::info!(
                        adapter = %spec.ids(), key = %key, bytes = resp.bytes, rank = resp.rank,
                        load_ms = resp.load_ns / 1_000_000, merge_ms = resp.merge_ns / 1_000_000,
                        "adapter prepared"
                    );
                    metrics::histogram!(names::LOAD, "kind" => spec.kind())
                        .record(resp.load_ns as f64 / 1e9);
                    if matches!(spec, AdapterSpec::Merged(_)) {
                        metrics::histogram!(names::MERGE).record(resp.merge_ns as f64 / 1e9);
                    }
                    if !s.registry.prepared(&key, id, resp.bytes) {
                        discard = Some(id);
                    }
                    None
                }
                JobDone::Installed {
                    key,
                    slot,
                    free_after,
                    spec,
                    result: Ok(resp),
                } => {
                    s.registry.free_slots(&free_after);
                    tracing::info!(adapter = %spec.ids(), key = %key, slot, bytes = resp.bytes, "adapter resident");
                    s.registry.installed(&key, resp.bytes, now);
                    None
                }
                JobDone::Prepared {
                    key,
                    spec,
                    result: Err(e),
                    ..
                } => {
                    let failure = prepare_failure(&spec, e);
                    s.registry.job_failed(&key, failure, now)
                }
                JobDone::Installed {
                    key,
                    free_after,
                    spec,
                    result: Err(e),
                    ..
                } => {
                    s.registry.free_slots(&free_after);
                    tracing::error!(adapter = %spec.ids(), key = %key, "adapter install failed: {e}");
                    count_failure(&e);
                    let error = if e.is_unavailable() {
                        InferError::Unavailable(e.to_string())
                    } else {
                        InferError::Generation(format!("Server error: {e}"))
                    };
                    let failure = Failure {
                        error,
                        cache: false,
                    };
                    s.registry.job_failed(&key, failure, now)
                }
            }
        };
        if let Some((error, entries)) = failed {
            fail_entries(&error, entries);
        }
        self.shared.batch.notify_one();
        self.shared.loader.notify_one();
        discard
    }
}

fn fail_entries(error: &InferError, entries: Vec<Entry>) {
    for e in entries {
        e.trace.failed(error);
        let _ = e.response_tx.send(Err(error.clone()));
    }
}

/// Counts a failed prepare or install by the shard's gRPC code.
fn count_failure(e: &ClientError) {
    let code = match e {
        ClientError::Rpc(status) => format!("{:?}", status.code()),
        _ => "Unavailable".to_string(),
    };
    metrics::counter!(names::FAILURES, "code" => code).increment(1);
}

/// The error requests get for a failed prepare, from the shard's status (the shard contract:
/// NOT_FOUND names the missing adapter, INVALID_ARGUMENT explains what is wrong with it).
fn prepare_failure(spec: &AdapterSpec, e: ClientError) -> Failure {
    tracing::warn!(adapter = %spec.ids(), "adapter load failed: {e}");
    count_failure(&e);
    let status = match e {
        ClientError::Rpc(status) => status,
        other => {
            return Failure {
                error: InferError::Unavailable(other.to_string()),
                cache: false,
            };
        }
    };
    let msg = status.message().to_string();
    let (error, cache) = match status.code() {
        tonic::Code::NotFound => (InferError::AdapterNotFound(not_found(spec, &msg)), true),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            (InferError::AdapterAccessDenied(msg), true)
        }
        tonic::Code::InvalidArgument => (
            InferError::Validation(ValidationError::AdapterRejected(msg)),
            true,
        ),
        tonic::Code::Unavailable | tonic::Code::Cancelled => (InferError::Unavailable(msg), false),
        _ => (InferError::Generation(format!("Server error: {msg}")), true),
    };
    Failure { error, cache }
}

fn not_found(spec: &AdapterSpec, msg: &str) -> String {
    match spec {
        AdapterSpec::Single(r) => format!("adapter `{}` ({}) not found: {msg}", r.id, r.source),
        _ => format!(
            "an adapter of the merge `{}` was not found: {msg}",
            spec.ids()
        ),
    }
}

/// The outcome of a shard call.
enum JobDone {
    /// Slots of unloaded adapters were freed.
    Offloaded { slots: Vec<u32> },
    Prepared {
        key: AdapterKey,
        id: u64,
        spec: AdapterSpec,
        result: Result<pb::PrepareAdapterResponse, ClientError>,
    },
    Installed {
        key: AdapterKey,
        slot: u32,
        free_after: Vec<u32>,
        spec: AdapterSpec,
        result: Result<pb::InstallAdapterResponse, ClientError>,
    },
}

/// A failed call's error, or [`ClientError::Stopped`] when the shards are gone or were
/// replaced (the requests then get UNAVAILABLE, and the error is not remembered).
async fn shards_or_request<T>(
    shard: &Guarded<impl ShardApi>,
    result: Result<T, ClientError>,
) -> Result<T, ClientError> {
    match result {
        Err(e) if shard.lost(&e).await => Err(ClientError::Stopped),
        other => other,
    }
}

/// Runs one job on the shards. A failed prepare or install drops what the ranks staged (some
/// may have succeeded); a failed install also empties its slot (best effort).
async fn run_job<S: ShardApi>(shard: Guarded<S>, job: Job) -> Option<JobDone> {
    match job {
        Job::Prepare {
            key,
            id,
            spec,
            trace,
        } => {
            let span = loader_span(&trace, || {
                tracing::info_span!(
                    parent: &trace,
                    "adapter_prepare",
                    adapter.kind = spec.kind(),
                    adapter.ids = %spec.ids(),
                    staging.id = id,
                )
            });
            let result = match medley_spec::wire::spec_to_proto(&spec) {
                Some(wire) => {
                    shard
                        .prepare_adapter(pb::PrepareAdapterRequest {
                            id,
                            spec: Some(wire),
                        })
                        .instrument(span)
                        .await
                }
                None => Err(ClientError::Rpc(tonic::Status::invalid_argument(
                    "the base model is not loaded into a slot",
                ))),
            };
            let result = shards_or_request(&shard, result).await;
            if result.is_err() {
                discard(&shard, id).await;
            }
            Some(JobDone::Prepared {
                key,
                id,
                spec,
                result,
            })
        }
        Job::Install {
            key,
            id,
            slot,
            offload,
            free_after,
            spec,
            trace,
        } => {
            for victim in &offload {
                if let Err(e) = shard.offload_adapter(*victim).await {
                    tracing::warn!(slot = victim, "offloading an evicted adapter failed: {e}");
                }
            }
            let span = loader_span(
                &trace,
                || tracing::info_span!(parent: &trace, "adapter_install", adapter.slot = slot),
            );
            let result = shard.install_adapter(id, slot).instrument(span).await;
            let result = shards_or_request(&shard, result).await;
            if result.is_err() {
                discard(&shard, id).await;
                if let Err(e) = shard.offload_adapter(slot).await {
                    tracing::debug!(slot, "offload after a failed install: {e}");
                }
            }
            Some(JobDone::Installed {
                key,
                slot,
                free_after,
                spec,
                result,
            })
        }
        Job::Discard { id } => {
            discard(&shard, id).await;
            None
        }
        Job::Offload { slots } => {
            for slot in &slots {
                if let Err(e) = shard.offload_adapter(*slot).await {
                    tracing::warn!(slot, "offloading an unloaded adapter failed: {e}");
                }
            }
            Some(JobDone::Offloaded { slots })
        }
    }
}

/// A span made by `make` under `parent` (a waiting request's), or none when no request waits
/// (a preload): loads get no traces of their own.
fn loader_span(parent: &tracing::Span, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if parent.is_disabled() {
        tracing::Span::none()
    } else {
        make()
    }
}

async fn discard(shard: &impl ShardApi, id: u64) {
    if let Err(e) = shard.discard_adapter(Some(id)).await {
        tracing::debug!(id, "discarding a staged adapter failed: {e}");
    }
}

/// How often the loader re-plans while an adapter is blocked (turns expire with time, not only
/// with events).
const BLOCKED_RECHECK: Duration = Duration::from_millis(50);

/// The loader: plans shard calls whenever something changed and runs them concurrently (with
/// each other and with the batching loop), recording their outcome. Runs until the client's
/// tripwire fires (its jobs are then dropped) or it is aborted.
pub(crate) async fn loader_task<S: ShardApi>(shard: Guarded<S>, scheduler: Scheduler) {
    let mut jobs: JoinSet<Option<JobDone>> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, Option<AdapterKey>> = HashMap::new();
    loop {
        let (planned, blocked) = scheduler.plan();
        for job in planned {
            let key = match &job {
                Job::Prepare { key, id, spec, .. } => {
                    tracing::debug!(adapter = %spec.ids(), key = %key, id, "preparing adapter");
                    Some(*key)
                }
                Job::Install {
                    key,
                    id,
                    slot,
                    offload,
                    ..
                } => {
                    tracing::debug!(key = %key, id, slot, evict = ?offload, "installing adapter");
                    Some(*key)
                }
                Job::Discard { .. } | Job::Offload { .. } => None,
            };
            let handle = jobs.spawn(run_job(shard.clone(), job));
            running.insert(handle.id(), key);
        }
        let recheck = if blocked {
            BLOCKED_RECHECK
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = shard.until_tripped() => return,
            _ = scheduler.shared.loader.notified() => {}
            Some(done) = jobs.join_next_with_id(), if !jobs.is_empty() => match done {
                Ok((id, done)) => {
                    running.remove(&id);
                    if let Some(stale) = done.and_then(|d| scheduler.finish(d)) {
                        jobs.spawn(run_job(shard.clone(), Job::Discard { id: stale }));
                    }
                }
                Err(e) => {
                    // A job task panicked or was cancelled: fail its adapter's requests.
                    tracing::error!("adapter job failed: {e}");
                    if let Some(Some(key)) = running.remove(&e.id()) {
                        let failed = scheduler.shared.lock().registry.job_failed(
                            &key,
                            Failure {
                                error: InferError::Generation(format!("Server error: {e}")),
                                cache: false,
                            },
                            Instant::now(),
                        );
                        if let Some((error, entries)) = failed {
                            fail_entries(&error, entries);
                        }
                    }
                }
            },
            _ = tokio::time::sleep(recheck) => {}
        }
    }
}
