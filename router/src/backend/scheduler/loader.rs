//! The adapter loader: plans shard calls (prepare, install, discard, offload) from the
//! registry, runs them concurrently with each other and with the batching loop, and records
//! their outcome.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use medley_proto::shard::v1 as pb;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Scheduler, fail_entries};
use crate::backend::client::ClientError;
use crate::backend::guarded::Guarded;
use crate::backend::registry::{Failure, Job};
use crate::backend::shard_api::ShardApi;
use crate::error::{InferError, ValidationError};
use crate::infer::{AdapterKey, AdapterSpec};

/// Metric names of the loader.
mod names {
    /// Histogram: seconds the shards spent reading adapter files, labelled `kind`.
    pub const LOAD: &str = "medley_adapter_load_duration";
    /// Histogram: seconds the shards spent merging.
    pub const MERGE: &str = "medley_adapter_merge_duration";
    /// Counter: failed loads, labelled `code` (the shard's gRPC code).
    pub const FAILURES: &str = "medley_adapter_load_failures";
}

impl Scheduler {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::{merge, single};
    use medley_spec::Strategy;

    /// Each shard status a prepare can end with becomes the error its requests get, with the
    /// HTTP and gRPC status the fronts answer, and is remembered or not.
    #[test]
    fn prepare_failures_map_shard_codes_to_request_errors() {
        use axum::http::StatusCode as Http;
        use tonic::Code;
        let cases = [
            (Code::NotFound, Http::NOT_FOUND, Code::NotFound, true),
            (
                Code::PermissionDenied,
                Http::FORBIDDEN,
                Code::PermissionDenied,
                true,
            ),
            (
                Code::Unauthenticated,
                Http::FORBIDDEN,
                Code::PermissionDenied,
                true,
            ),
            (
                Code::InvalidArgument,
                Http::UNPROCESSABLE_ENTITY,
                Code::InvalidArgument,
                true,
            ),
            (
                Code::Unavailable,
                Http::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                false,
            ),
            (
                Code::Cancelled,
                Http::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                false,
            ),
            (
                Code::Internal,
                Http::FAILED_DEPENDENCY,
                Code::FailedPrecondition,
                true,
            ),
        ];
        for (shard, http, grpc, cache) in cases {
            let status = tonic::Status::new(shard, "what the shard said");
            let f = prepare_failure(&single("org/a"), ClientError::Rpc(status));
            assert_eq!(f.error.http_status(), http, "{shard:?}: {}", f.error);
            assert_eq!(f.error.grpc_code(), grpc, "{shard:?}: {}", f.error);
            assert_eq!(f.cache, cache, "{shard:?}");
            assert!(
                f.error.to_string().contains("what the shard said"),
                "{}",
                f.error
            );
        }
        // A lost connection is no verdict on the adapter: not remembered.
        let f = prepare_failure(&single("org/a"), ClientError::Stopped);
        assert_eq!(f.error.grpc_code(), Code::Unavailable);
        assert!(!f.cache);
    }

    /// A missing adapter is named: the adapter and its source, or the merge it belongs to.
    #[test]
    fn not_found_names_the_adapter_or_the_merge() {
        let status = || ClientError::Rpc(tonic::Status::not_found("no such repo"));
        let one = prepare_failure(&single("org/a"), status())
            .error
            .to_string();
        assert!(
            one.contains("`org/a`") && one.contains("no such repo"),
            "{one}"
        );
        let spec = merge(&["org/a", "org/b"], Strategy::Linear);
        let merged = prepare_failure(&spec, status()).error.to_string();
        assert!(
            merged.contains("org/a") && merged.contains("org/b"),
            "{merged}"
        );
        assert!(merged.contains("merge"), "{merged}");
    }
}
