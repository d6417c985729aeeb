//! The backend seam: what [`crate::infer::Infer`] needs from whatever runs the model, and the
//! production implementation, [`ShardBackend`]: continuous batching over gRPC shards.
//!
//! * [`client`] — gRPC clients of the shards (Unix sockets, fan-out to every rank).
//! * `queue` — waiting requests and the batch builder.
//! * `batcher` — the batching loop.

mod batcher;
pub mod client;
mod queue;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use medley_proto::shard::v1 as pb;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::RouterConfig;
use client::{ClientError, ShardedClient};
use queue::{Entry, Queue};

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

/// Continuous batching over the shards of one model.
pub struct ShardBackend {
    client: ShardedClient,
    queue: Arc<Queue>,
    notify: Arc<Notify>,
    info: BackendInfo,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ShardBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to every shard in `config.shard_uds_paths`, clears their caches, warms them up,
/// sizes the batch budget and starts the batching loop.
pub async fn connect(config: &RouterConfig) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(Arc::new(ShardBackend::connect(config).await?))
}

impl ShardBackend {
    /// See [`connect`].
    pub async fn connect(config: &RouterConfig) -> Result<Self, BackendError> {
        let client = ShardedClient::connect(&config.shard_uds_paths).await?;
        let info = client.info().await?;
        client.clear_cache(None).await?;
        let limits = &config.limits;
        if limits.max_total_tokens as u64 > info.max_position_embeddings as u64 {
            tracing::warn!(
                max_total_tokens = limits.max_total_tokens,
                max_position_embeddings = info.max_position_embeddings,
                "--max-total-tokens exceeds the model's positions; sequences stop at the model limit"
            );
        }
        let t0 = Instant::now();
        let capacity = client
            .warmup(pb::WarmupRequest {
                batch: None,
                max_input_tokens: limits.max_input_length,
                max_prefill_tokens: config.batching.max_batch_prefill_tokens,
                max_total_tokens: limits.max_total_tokens,
            })
            .await?;
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        let max_batch_total_tokens = match config.batching.max_batch_total_tokens {
            Some(t) if t > capacity => {
                return Err(BackendError::Config(format!(
                    "--max-batch-total-tokens {t} exceeds the KV cache capacity of the shards ({capacity} tokens)"
                )));
            }
            Some(t) => t,
            None => capacity,
        };
        if max_batch_total_tokens < limits.max_total_tokens {
            return Err(BackendError::Config(format!(
                "the KV cache holds {max_batch_total_tokens} tokens, less than --max-total-tokens {}",
                limits.max_total_tokens
            )));
        }
        tracing::info!(
            max_batch_total_tokens,
            warmup_ms = t0.elapsed().as_millis() as u64,
            "shards warmed up"
        );
        let queue = Arc::new(Queue::default());
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(batcher::batching_task(
            client.clone(),
            queue.clone(),
            notify.clone(),
            batcher::LoopConfig {
                batching: config.batching.clone(),
                max_batch_total_tokens,
            },
        ));
        Ok(Self {
            client,
            queue,
            notify,
            info: BackendInfo {
                model_dtype: info.dtype,
                model_device_type: info.device_type,
                world_size: info.world_size,
                max_batch_total_tokens,
            },
            task,
        })
    }
}

impl Backend for ShardBackend {
    fn schedule(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<Result<InferStreamResponse, InferError>>, InferError> {
        if self.task.is_finished() {
            return Err(InferError::Unavailable("the batching loop stopped".into()));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.queue.append(Entry {
            request,
            response_tx: tx,
            queued: Instant::now(),
            batch_time: None,
        });
        self.notify.notify_one();
        Ok(rx)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(10), self.client.health()).await,
                Ok(Ok(()))
            )
        })
    }

    fn info(&self) -> BackendInfo {
        self.info.clone()
    }
}
