//! The scheduler shared by the batching loop and the adapter loader: the [`Registry`] (queues
//! and adapter residency) behind one lock, the wake-ups of both tasks, leases that pin an
//! adapter while its requests run, and the loader task that loads adapters and computes merges
//! concurrently with the batching loop.
//!
//! Single flight: a key has one record; the first request for it starts one load, later ones
//! wait in its queue, so N concurrent identical merges make one `LoadAdapter` call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use medley_proto::shard::v1 as pb;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

use super::client::ClientError;
use super::queue::{BatchBudget, Entry, take_batch, to_proto_request};
use super::registry::{self, Enqueued, LoadFailure, LoadJob, Registry, RegistryConfig};
use super::shard_api::ShardApi;
use crate::error::{InferError, ValidationError};
use crate::infer::{
    AdapterKey, AdapterRef, AdapterSource, AdapterSpec, InferStreamResponse, ValidGenerateRequest,
};

/// Metric names of the scheduler and the loader.
mod names {
    /// Histogram: seconds the shards spent reading adapter files, labelled `kind`.
    pub const LOAD: &str = "medley_adapter_load_duration";
    /// Histogram: seconds the shards spent merging.
    pub const MERGE: &str = "medley_adapter_merge_duration";
    /// Counter: failed loads, labelled `code` (the shard's gRPC code).
    pub const FAILURES: &str = "medley_adapter_load_failures";
    /// Gauge: waiting requests.
    pub const QUEUE_SIZE: &str = "medley_queue_size";
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
        let kind = spec.kind();
        let key = if spec.is_base() {
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
            metrics::gauge!(names::QUEUE_SIZE).set(s.registry.queued() as f64);
            enqueued
        };
        if kind != "base" {
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

    /// Takes the next batch within `budget` (see [`take_batch`]).
    pub fn next_batch(&self, budget: BatchBudget) -> Option<NextBatch> {
        let now = Instant::now();
        let (taken, batch_id) = {
            let mut s = self.shared.lock();
            let taken = take_batch(&mut s.registry, budget, now);
            metrics::gauge!(names::QUEUE_SIZE).set(s.registry.queued() as f64);
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

    /// Waits until a request may be able to run.
    pub async fn wait_for_work(&self) {
        self.shared.batch.notified().await;
    }

    fn plan(&self) -> (Vec<LoadJob>, bool) {
        let (plan, blocked) = {
            let mut s = self.shared.lock();
            let plan = s.registry.plan(Instant::now());
            (plan, s.registry.adapters.values().any(|a| a.blocked))
        };
        for (error, entries) in plan.failed {
            fail_entries(&error, entries);
        }
        (plan.jobs, blocked)
    }

    fn finish(&self, done: JobDone) {
        let JobDone { job, result } = done;
        let now = Instant::now();
        let kind = job.spec.kind();
        let failed = {
            let mut s = self.shared.lock();
            s.registry.free_slots(&job.free_after);
            match result {
                Ok(resp) => {
                    tracing::info!(
                        adapter = %job.spec.ids(), key = %job.key, slot = job.slot,
                        bytes = resp.bytes, rank = resp.rank,
                        load_ms = resp.load_ns / 1_000_000, merge_ms = resp.merge_ns / 1_000_000,
                        "adapter resident"
                    );
                    metrics::histogram!(names::LOAD, "kind" => kind)
                        .record(resp.load_ns as f64 / 1e9);
                    if resp.merge_ns > 0 || matches!(job.spec, AdapterSpec::Merged(_)) {
                        metrics::histogram!(names::MERGE).record(resp.merge_ns as f64 / 1e9);
                    }
                    s.registry.loaded(&job.key, job.slot, resp.bytes, now);
                    None
                }
                Err(e) => {
                    let code = match &e {
                        ClientError::Rpc(status) => format!("{:?}", status.code()),
                        _ => "Unavailable".to_string(),
                    };
                    tracing::warn!(adapter = %job.spec.ids(), key = %job.key, slot = job.slot, "adapter load failed: {e}");
                    metrics::counter!(names::FAILURES, "code" => code).increment(1);
                    let failure = load_failure(&job.spec, e);
                    s.registry.load_failed(&job.key, job.slot, failure, now)
                }
            }
        };
        if let Some((error, entries)) = failed {
            fail_entries(&error, entries);
        }
        self.shared.batch.notify_one();
        self.shared.loader.notify_one();
    }
}

fn fail_entries(error: &InferError, entries: Vec<Entry>) {
    for e in entries {
        let _ = e.response_tx.send(Err(error.clone()));
    }
}

/// The error requests get for a failed load, from the shard's status (the shard contract:
/// NOT_FOUND names the missing adapter, INVALID_ARGUMENT explains what is wrong with it,
/// RESOURCE_EXHAUSTED means not enough adapter memory is free).
fn load_failure(spec: &AdapterSpec, e: ClientError) -> LoadFailure {
    let status = match e {
        ClientError::Rpc(status) => status,
        other => {
            return LoadFailure::Failed {
                error: InferError::Unavailable(other.to_string()),
                cache: false,
            };
        }
    };
    let msg = status.message().to_string();
    let (error, cache) = match status.code() {
        tonic::Code::ResourceExhausted => return LoadFailure::NoRoom(msg),
        tonic::Code::NotFound => (InferError::AdapterNotFound(not_found(spec, &msg)), true),
        tonic::Code::InvalidArgument => (
            InferError::Validation(ValidationError::AdapterRejected(msg)),
            true,
        ),
        tonic::Code::Unavailable | tonic::Code::Cancelled => (InferError::Unavailable(msg), false),
        _ => (InferError::Generation(format!("Server error: {msg}")), true),
    };
    LoadFailure::Failed { error, cache }
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

/// The shard's form of an adapter spec.
pub(crate) fn to_proto_spec(spec: &AdapterSpec) -> Option<pb::AdapterSpec> {
    use pb::adapter_spec::Kind;
    let adapter_ref = |r: &AdapterRef| pb::AdapterRef {
        id: r.id.clone(),
        source: match r.source {
            AdapterSource::Hub => pb::AdapterSource::Hub,
            AdapterSource::Local => pb::AdapterSource::Local,
        } as i32,
        revision: r.revision.clone(),
        api_token: r.api_token.clone(),
    };
    let kind = match spec {
        AdapterSpec::Base => return None,
        AdapterSpec::Single(r) => Kind::Single(adapter_ref(r)),
        AdapterSpec::Merged(m) => {
            let c = m.merge.canonical();
            Kind::Merged(pb::MergeParameters {
                components: m
                    .components
                    .iter()
                    .zip(&c.weights)
                    .map(|(r, w)| pb::MergeComponent {
                        adapter: Some(adapter_ref(r)),
                        weight: *w,
                    })
                    .collect(),
                strategy: c.strategy.name().into(),
                density: c.density,
                majority_sign_method: c.sign_method.name().into(),
                seed: c.seed,
                svd_rank: c.svd_rank.and_then(|r| u32::try_from(r).ok()),
                semantics: c.semantics.name().into(),
            })
        }
    };
    Some(pb::AdapterSpec { kind: Some(kind) })
}

struct JobDone {
    job: LoadJob,
    result: Result<pb::LoadAdapterResponse, ClientError>,
}

/// Offloads the job's victims, then loads its adapter; on failure the slot is offloaded too
/// (best effort: some ranks may have filled it).
async fn run_job<S: ShardApi>(shard: S, job: LoadJob) -> JobDone {
    for slot in &job.offload {
        if let Err(e) = shard.offload_adapter(*slot).await {
            tracing::warn!(slot, "offloading an evicted adapter failed: {e}");
        }
    }
    let result = match to_proto_spec(&job.spec) {
        Some(spec) => {
            shard
                .load_adapter(pb::LoadAdapterRequest {
                    slot: job.slot,
                    spec: Some(spec),
                })
                .await
        }
        None => Err(ClientError::Rpc(tonic::Status::invalid_argument(
            "the base model is not loaded into a slot",
        ))),
    };
    if result.is_err()
        && let Err(e) = shard.offload_adapter(job.slot).await
    {
        tracing::debug!(slot = job.slot, "offload after a failed load: {e}");
    }
    JobDone { job, result }
}

/// How often the loader re-plans while an adapter is blocked (turns expire with time, not only
/// with events).
const BLOCKED_RECHECK: Duration = Duration::from_millis(50);

/// The loader: plans loads whenever something changed and runs them concurrently (with each
/// other and with the batching loop), recording their outcome. Runs until aborted.
pub(crate) async fn loader_task<S: ShardApi>(shard: S, scheduler: Scheduler) {
    let mut jobs: JoinSet<JobDone> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, (AdapterKey, u32)> = HashMap::new();
    loop {
        let (planned, blocked) = scheduler.plan();
        for job in planned {
            tracing::debug!(adapter = %job.spec.ids(), key = %job.key, slot = job.slot, evict = ?job.offload, "loading adapter");
            let meta = (job.key, job.slot);
            let handle = jobs.spawn(run_job(shard.clone(), job));
            running.insert(handle.id(), meta);
        }
        let recheck = if blocked {
            BLOCKED_RECHECK
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = scheduler.shared.loader.notified() => {}
            Some(done) = jobs.join_next_with_id(), if !jobs.is_empty() => match done {
                Ok((id, done)) => {
                    running.remove(&id);
                    scheduler.finish(done);
                }
                Err(e) => {
                    // A load task panicked or was cancelled: fail its adapter's requests.
                    tracing::error!("adapter load task failed: {e}");
                    if let Some((key, slot)) = running.remove(&e.id()) {
                        let failed = scheduler.shared.lock().registry.load_failed(
                            &key,
                            slot,
                            LoadFailure::Failed {
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
