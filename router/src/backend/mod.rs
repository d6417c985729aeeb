//! The backend seam: what [`crate::infer::Infer`] needs from whatever runs the model, and the
//! production implementation, [`ShardBackend`]: continuous batching over gRPC shards.
//!
//! * [`client`] — gRPC clients of the shards (Unix sockets, fan-out to every rank).
//! * [`shard_api`] — the calls made to the shards ([`ShardApi`]), so tests can use a fake shard.
//! * `registry` — the one owner of per-adapter queues and adapter residency (slots, the byte
//!   budget, pins, LRU, errors) and of the batch builder over those queues.
//! * `queue` — a queued request and the budgets of one batch.
//! * `scheduler` — the registry behind a lock, adapter leases, and the adapter loader task.
//! * `batcher` — the batching loop.
//! * `kv` — the shards' KV block pool as the latest step reported it.
//! * `guarded` — shard calls that end when their backend is stopped.
//! * `recovery` — [`RecoveringBackend`]: notices dead or restarted shards, fails what they
//!   held, and reconnects to the new ones.

pub mod adapters;
mod batcher;
pub mod client;
mod guarded;
mod kv;
mod queue;
mod recovery;
mod registry;
mod scheduler;
pub mod shard_api;
#[cfg(test)]
mod step_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::RouterConfig;
use crate::infer::AdapterSpec;
use adapters::{AdapterView, AdminError, Residency};
use client::{ClientError, ShardedClient};
use guarded::Guarded;
pub use kv::KvBlocks;
use kv::KvView;
pub use recovery::{Connector, RecoveringBackend, RecoveryConfig, UdsConnector};
use registry::RegistryConfig;
use scheduler::Scheduler;
pub use shard_api::ShardApi;

use crate::error::InferError;
use crate::infer::{InferStreamResponse, ValidGenerateRequest};

/// Facts about the model behind a backend, reported by `/info`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// Compute dtype of the model (`float32`, `bfloat16`, ...).
    pub model_dtype: String,
    /// `cpu` or `cuda`.
    pub model_device_type: String,
    /// Number of tensor-parallel shards.
    pub world_size: u32,
    /// Tokens (prompt + new) all running requests may hold together.
    pub max_batch_total_tokens: u32,
    /// Adapter slots of the shards (0 = adapters disabled).
    pub max_adapter_slots: u32,
    /// Bytes of adapter weights the shards may hold (0 = not limited by the router).
    pub adapter_memory_bytes: u64,
    /// Tokens per KV-cache block on the shards (0: not reported).
    pub kv_block_tokens: u32,
}

/// Runs validated requests and streams their tokens back.
pub trait Backend: Send + Sync + 'static {
    /// Queues a request. Events arrive on the returned channel, ending with
    /// [`InferStreamResponse::End`] or an error. Dropping the receiver cancels the request.
    fn schedule(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<Result<InferStreamResponse, InferError>>, InferError>;

    /// True when the model can serve requests.
    fn health(&self) -> BoxFuture<'_, bool>;

    /// Facts about the model.
    fn info(&self) -> BackendInfo;

    /// The shards' KV block pool after the latest step (`None` until one reported it).
    fn kv_blocks(&self) -> Option<KvBlocks> {
        None
    }

    /// Adapter residency on the shards (a backend without adapter slots tracks none).
    fn residency(&self) -> Result<Residency, AdminError> {
        Ok(Residency::default())
    }

    /// Loads `spec` into a slot ahead of requests (`pinned`: and never evicts it). With `wait`,
    /// resolves once it is resident or its load failed; else at once, with its state then.
    fn preload(
        &self,
        spec: AdapterSpec,
        pinned: bool,
        wait: bool,
    ) -> BoxFuture<'_, Result<AdapterView, AdminError>> {
        let _ = (spec, pinned, wait);
        Box::pin(async { Err(adapters_disabled()) })
    }

    /// Takes the tracked adapter whose full hex key starts with `key` off the shards.
    fn unload(&self, key: &str) -> Result<AdapterView, AdminError> {
        Err(AdminError::NotTracked(key.to_string()))
    }
}

/// The error of a preload where adapters are disabled.
fn adapters_disabled() -> AdminError {
    InferError::Validation(crate::error::ValidationError::AdaptersDisabled).into()
}

/// Errors while connecting the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A shard could not be reached or failed a setup call.
    #[error("shard: {0}")]
    Shard(#[from] ClientError),
    /// The configuration does not fit what the shards can hold.
    #[error("{0}")]
    Config(String),
}

/// Adapters being prepared (read, merged), prepared or installed at once: merges are CPU-heavy
/// on the shards, and prepared adapters wait there outside the adapter budget.
const MAX_CONCURRENT_LOADS: usize = 4;
/// How long a failed adapter load answers new requests with its error before it is retried.
const ADAPTER_ERROR_TTL: Duration = Duration::from_secs(10);
/// How long a health check of the shards may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Evicted adapters remembered (for their size) before they are forgotten.
const MAX_TRACKED_ADAPTERS: usize = 4096;

/// How long [`ShardBackend::stop`] waits for its tasks to hand their requests back.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Continuous batching over the shards of one model, with adapter scheduling. It serves the
/// shard processes it was started on: once they die or restart it is stopped, and
/// [`RecoveringBackend`] starts a new one on the new processes.
pub struct ShardBackend<S: ShardApi = ShardedClient> {
    client: Guarded<S>,
    scheduler: Scheduler,
    info: BackendInfo,
    kv: KvView,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<S: ShardApi> Drop for ShardBackend<S> {
    fn drop(&mut self) {
        self.client.trip("the backend was dropped");
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects to every shard in `config.shard_uds_paths`, fits the token limits the flags left
/// open to the model the shards report, clears their caches and adapter slots, warms them up,
/// sizes the batch budget and starts the batching loop and the adapter loader. Returns the
/// fitted config with the backend, which reconnects by itself when the shards restart
/// ([`RecoveringBackend`]).
pub async fn connect(
    mut config: RouterConfig,
) -> Result<(RouterConfig, std::sync::Arc<dyn Backend>), BackendError> {
    let connector = UdsConnector::new(config.shard_uds_paths.clone());
    let client = connector.connect().await?;
    let info = client.info().await?;
    config
        .fit_model(info.max_position_embeddings)
        .map_err(|e| BackendError::Config(e.to_string()))?;
    config.fit_device(&info.device_type);
    let backend = ShardBackend::start(client, &config).await?;
    let backend = RecoveringBackend::new(
        backend,
        connector,
        config.clone(),
        RecoveryConfig::default(),
    );
    Ok((config, std::sync::Arc::new(backend)))
}

impl<S: ShardApi> ShardBackend<S> {
    /// Sets up `client` (see [`connect`]) and starts the background tasks.
    pub async fn start(client: S, config: &RouterConfig) -> Result<Self, BackendError> {
        let instance = client.health().await?;
        client.clear_cache(None).await?;
        clear_adapter_slots(&client).await;
        let limits = &config.limits;
        let t0 = Instant::now();
        let capacity = client
            .warmup(pb::WarmupRequest {
                batch: None,
                max_input_tokens: limits.max_input_length,
                max_prefill_tokens: config.batching.max_batch_prefill_tokens,
                max_total_tokens: limits.max_total_tokens,
                max_idle_prefill_tokens: config.batching.idle_prefill_tokens(),
            })
            .await?;
        // After the warm-up: the shards fit their adapter budget to the GPU memory it left.
        let info = client.info().await?;
        if limits.max_total_tokens as u64 > info.max_position_embeddings as u64 {
            tracing::warn!(
                max_total_tokens = limits.max_total_tokens,
                max_position_embeddings = info.max_position_embeddings,
                "--max-total-tokens exceeds the model's positions; sequences stop at the model limit"
            );
        }
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        if capacity == 0 || capacity < limits.max_total_tokens {
            return Err(BackendError::Config(format!(
                "the KV cache holds {capacity} tokens, less than --max-total-tokens {}",
                limits.max_total_tokens
            )));
        }
        let max_batch_total_tokens = match config.batching.max_batch_total_tokens {
            Some(t) if t > capacity => {
                tracing::warn!(
                    max_batch_total_tokens = t,
                    kv_cache_tokens = capacity,
                    "--max-batch-total-tokens over-commits the KV cache of the shards: when it runs out they preempt requests and recompute them later"
                );
                t
            }
            Some(t) => t,
            None => capacity,
        };
        tracing::info!(
            max_batch_total_tokens,
            warmup_ms = t0.elapsed().as_millis() as u64,
            adapter_slots = info.max_adapter_slots,
            adapter_memory_bytes = info.adapter_memory_bytes,
            "shards warmed up"
        );
        if info.max_adapter_slots > 0 && info.adapter_memory_bytes == 0 {
            tracing::warn!(
                "the shards report adapter slots but no adapter memory budget; the router will not limit adapter bytes"
            );
        }
        let scheduler = Scheduler::new(RegistryConfig {
            max_slots: info.max_adapter_slots,
            budget_bytes: match info.adapter_memory_bytes {
                0 => u64::MAX,
                b => b,
            },
            max_active_adapters: config.batching.max_active_adapters,
            cycle_time: config.batching.adapter_cycle_time,
            max_concurrent_loads: MAX_CONCURRENT_LOADS,
            error_ttl: ADAPTER_ERROR_TTL,
            max_tracked: MAX_TRACKED_ADAPTERS,
        });
        let client = Guarded::new(client, instance);
        let kv = KvView::default();
        let tasks = vec![
            tokio::spawn(batcher::batching_task(
                client.clone(),
                scheduler.clone(),
                batcher::LoopConfig {
                    batching: config.batching.clone(),
                    max_batch_total_tokens,
                },
                kv.clone(),
            )),
            tokio::spawn(scheduler::loader_task(client.clone(), scheduler.clone())),
        ];
        Ok(Self {
            client,
            scheduler,
            info: BackendInfo {
                model_dtype: info.dtype,
                model_device_type: info.device_type,
                world_size: info.world_size,
                max_batch_total_tokens,
                max_adapter_slots: info.max_adapter_slots,
                adapter_memory_bytes: info.adapter_memory_bytes,
                kv_block_tokens: info.kv_block_tokens,
            },
            kv,
            tasks,
        })
    }

    /// Ok while every rank answers and is still the process this backend set up.
    pub async fn check(&self, timeout: Duration) -> Result<(), Unhealthy> {
        match tokio::time::timeout(timeout, self.client.health()).await {
            Ok(Ok(instance)) if instance == self.client.instance() => Ok(()),
            Ok(Ok(_)) => Err(Unhealthy::Restarted),
            Ok(Err(e)) => Err(Unhealthy::Failed(e.to_string())),
            Err(_) => Err(Unhealthy::Failed(format!(
                "no answer to a health check within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// True when a background task ended (only [`ShardBackend::stop`] or a panic end them).
    pub fn tasks_finished(&self) -> bool {
        self.tasks.iter().any(|t| t.is_finished())
    }

    /// UNAVAILABLE once the backend stopped (its shards are gone or a task ended).
    fn ensure_running(&self) -> Result<(), InferError> {
        if self.client.tripped().is_some() || self.tasks_finished() {
            return Err(InferError::Unavailable("the batching loop stopped".into()));
        }
        Ok(())
    }

    /// Resolves, with the reason, when a failed call showed the shards gone or replaced.
    pub async fn lost(&self) -> String {
        self.client.until_tripped().await;
        self.client
            .tripped()
            .unwrap_or_else(|| "the shards were lost".into())
    }

    /// Stops serving: calls in flight end at once, running and queued requests fail with
    /// `error`, and the background tasks end (waited for at most `STOP_TIMEOUT`, then
    /// aborted).
    pub async fn stop(&self, error: InferError) {
        self.client.trip(error.to_string());
        self.scheduler.fail_queued(&error);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.tasks.iter().all(|t| t.is_finished()) {
            if Instant::now() >= deadline {
                tracing::warn!("backend tasks did not stop in time: aborting them");
                self.tasks.iter().for_each(|t| t.abort());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Requests queued while the tasks were stopping.
        self.scheduler.fail_queued(&error);
    }
}

/// Why [`ShardBackend::check`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// A rank is a new process: it holds none of this backend's batches or adapters.
    #[error("a shard was restarted")]
    Restarted,
    /// A rank does not answer, or reports a failure (e.g. a broken tensor-parallel group).
    #[error("{0}")]
    Failed(String),
}

/// Frees adapter slots and staged adapters a previous router left (their keys are unknown here).
async fn clear_adapter_slots(client: &impl ShardApi) {
    if let Err(e) = client.discard_adapter(None).await {
        tracing::warn!("cannot drop the shards' staged adapters: {e}");
    }
    match client.list_adapters().await {
        Ok(list) => {
            for s in list.slots {
                tracing::info!(
                    slot = s.slot,
                    bytes = s.bytes,
                    "freeing an adapter slot left by a previous router"
                );
                if let Err(e) = client.offload_adapter(s.slot).await {
                    tracing::warn!(slot = s.slot, "cannot free adapter slot: {e}");
                }
            }
        }
        Err(ClientError::Rpc(s)) if s.code() == tonic::Code::Unimplemented => {
            tracing::debug!("the shards do not list adapters: {}", s.message());
        }
        Err(e) => tracing::warn!("cannot list the shards' adapter slots: {e}"),
    }
}

impl<S: ShardApi> Backend for ShardBackend<S> {
    fn schedule(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<Result<InferStreamResponse, InferError>>, InferError> {
        self.ensure_running()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.scheduler.append(request, tx)?;
        Ok(rx)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.check(HEALTH_TIMEOUT).await.is_ok() })
    }

    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn kv_blocks(&self) -> Option<KvBlocks> {
        self.kv.get()
    }

    fn residency(&self) -> Result<Residency, AdminError> {
        Ok(self.scheduler.residency())
    }

    fn preload(
        &self,
        spec: AdapterSpec,
        pinned: bool,
        wait: bool,
    ) -> BoxFuture<'_, Result<AdapterView, AdminError>> {
        Box::pin(async move {
            self.ensure_running()?;
            let (key, done) = self.scheduler.preload(spec, pinned)?;
            if wait {
                match done.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        return Err(InferError::Unavailable(
                            "the backend stopped while the adapter was loading".into(),
                        )
                        .into());
                    }
                }
            }
            self.scheduler
                .adapter(&key)
                .ok_or_else(|| AdminError::NotTracked(key.hex()))
        })
    }

    fn unload(&self, key: &str) -> Result<AdapterView, AdminError> {
        let key = self.scheduler.find(key)?;
        self.scheduler.unload(&key)
    }
}
