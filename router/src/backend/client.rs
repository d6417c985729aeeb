//! gRPC clients of the shards: one per rank over its Unix socket, and a fan-out wrapper that
//! sends every call to every rank (so collectives stay in lock-step) and reads rank 0's answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::try_join_all;
use hyper_util::rt::TokioIo;
use medley_proto::shard::v1 as pb;
use medley_proto::shard::v1::shard_service_client::ShardServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use super::shard_api::ShardApi;

/// Errors talking to shards.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to shard at {path}: {message}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The shard answered with an error or the connection broke.
    #[error("{}", .0.message())]
    Rpc(tonic::Status),
    /// No shard configured.
    #[error("no shard sockets configured")]
    NoShards,
    /// The call was abandoned: the shards failed or restarted, and the backend that made it
    /// was stopped.
    #[error("the shards stopped answering; they are being reconnected")]
    Stopped,
}

impl ClientError {
    /// True when the shard is unreachable (as opposed to failing the request): it is not
    /// there, the connection broke, or it says so (UNAVAILABLE, e.g. a broken tensor-parallel
    /// group).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::NoShards | Self::Stopped => true,
            Self::Rpc(s) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                    || is_transport_failure(s)
            }
        }
    }
}

/// A status made by the client from a broken connection (not sent by the shard): a transport
/// error or an I/O error somewhere in its causes.
fn is_transport_failure(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        cause = e.source();
    }
    false
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc(s)
    }
}

/// Opens a gRPC channel over a Unix socket.
pub async fn connect_uds(path: &Path) -> Result<Channel, ClientError> {
    let socket = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// One number for the processes of a group, from each rank's instance id in rank order: it
/// changes when any rank is restarted.
pub fn group_instance(instances: impl IntoIterator<Item = u64>) -> u64 {
    instances.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, i| {
        (h ^ i).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes the current span's trace context into a call's metadata (`traceparent`); nothing
/// when the span has none (tracing off, or a call outside any request, such as a decode step).
fn inject_trace_context(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    medley_telemetry::inject_current(&mut request);
    Ok(request)
}

type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// The client of one rank; every call carries the caller's trace context.
type RankClient = ShardServiceClient<InterceptedService<Channel, Interceptor>>;

/// All ranks of one model.
#[derive(Clone)]
pub struct ShardedClient {
    clients: Vec<RankClient>,
}

const MAX_MESSAGE: usize = 256 << 20;

impl ShardedClient {
    /// Connects to every socket, rank 0 first.
    pub async fn connect(paths: &[PathBuf]) -> Result<Self, ClientError> {
        if paths.is_empty() {
            return Err(ClientError::NoShards);
        }
        let mut clients = Vec::with_capacity(paths.len());
        for p in paths {
            clients.push(
                ShardServiceClient::with_interceptor(
                    connect_uds(p).await?,
                    inject_trace_context as Interceptor,
                )
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            );
        }
        Ok(Self { clients })
    }

    /// Sends the same call to every rank concurrently; returns every rank's response, in rank
    /// order.
    async fn each<T, F, Fut>(&self, call: F) -> Result<Vec<T>, ClientError>
    where
        F: Fn(RankClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let results = try_join_all(self.clients.iter().cloned().map(call)).await?;
        Ok(results
            .into_iter()
            .map(tonic::Response::into_inner)
            .collect())
    }

    /// Sends the same call to every rank concurrently; returns rank 0's response.
    async fn all<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(RankClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.each(call)
            .await?
            .into_iter()
            .next()
            .ok_or(ClientError::NoShards)
    }
}

impl ShardApi for ShardedClient {
    /// Rank 0's answer, with the smallest adapter budget of any rank (each rank fits its own to
    /// its GPU's free memory at warm-up).
    async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        let infos = self
            .each(|mut c| async move { c.info(pb::InfoRequest {}).await })
            .await?;
        let budget = infos.iter().map(|i| i.adapter_memory_bytes).min();
        let mut first = infos.into_iter().next().ok_or(ClientError::NoShards)?;
        first.adapter_memory_bytes = budget.unwrap_or(first.adapter_memory_bytes);
        Ok(first)
    }

    async fn health(&self) -> Result<u64, ClientError> {
        let answers = self
            .each(|mut c| async move { c.health(pb::HealthRequest {}).await })
            .await?;
        Ok(group_instance(answers.into_iter().map(|h| h.instance)))
    }

    async fn warmup(&self, req: pb::WarmupRequest) -> Result<u64, ClientError> {
        let answers = self
            .each(|mut c| {
                let req = req.clone();
                async move { c.warmup(req).await }
            })
            .await?;
        answers
            .into_iter()
            .map(|w| w.max_supported_total_tokens)
            .min()
            .ok_or(ClientError::NoShards)
    }

    async fn prefill(
        &self,
        batch: pb::Batch,
        running: Vec<pb::CachedBatch>,
    ) -> Result<pb::PrefillResponse, ClientError> {
        self.all(|mut c| {
            let request = pb::PrefillRequest {
                batch: Some(batch.clone()),
                running: running.clone(),
            };
            async move { c.prefill(request).await }
        })
        .await
    }

    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
    ) -> Result<pb::DecodeResponse, ClientError> {
        self.all(|mut c| {
            let batches = batches.clone();
            async move { c.decode(pb::DecodeRequest { batches }).await }
        })
        .await
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        self.all(|mut c| {
            let request_ids = request_ids.clone();
            async move {
                c.filter_batch(pb::FilterBatchRequest {
                    batch_id,
                    request_ids,
                })
                .await
            }
        })
        .await
        .map(|r| r.batch)
    }

    async fn clear_cache(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.all(|mut c| async move { c.clear_cache(pb::ClearCacheRequest { id }).await })
            .await
            .map(|_| ())
    }

    async fn prepare_adapter(
        &self,
        req: pb::PrepareAdapterRequest,
    ) -> Result<pb::PrepareAdapterResponse, ClientError> {
        let results = try_join_all(self.clients.iter().cloned().map(|mut c| {
            let req = req.clone();
            async move { c.prepare_adapter(req).await }
        }))
        .await?;
        let mut answers = results.into_iter().map(tonic::Response::into_inner);
        let mut first = answers.next().ok_or(ClientError::NoShards)?;
        for other in answers {
            first.bytes = first.bytes.max(other.bytes);
            first.load_ns = first.load_ns.max(other.load_ns);
            first.merge_ns = first.merge_ns.max(other.merge_ns);
        }
        Ok(first)
    }

    async fn install_adapter(
        &self,
        id: u64,
        slot: u32,
    ) -> Result<pb::InstallAdapterResponse, ClientError> {
        let results = try_join_all(self.clients.iter().cloned().map(|mut c| async move {
            c.install_adapter(pb::InstallAdapterRequest { id, slot })
                .await
        }))
        .await?;
        let mut answers = results.into_iter().map(tonic::Response::into_inner);
        let mut first = answers.next().ok_or(ClientError::NoShards)?;
        for other in answers {
            first.bytes = first.bytes.max(other.bytes);
        }
        Ok(first)
    }

    async fn discard_adapter(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.all(|mut c| async move { c.discard_adapter(pb::DiscardAdapterRequest { id }).await })
            .await
            .map(|_| ())
    }

    async fn offload_adapter(&self, slot: u32) -> Result<(), ClientError> {
        self.all(|mut c| async move { c.offload_adapter(pb::OffloadAdapterRequest { slot }).await })
            .await
            .map(|_| ())
    }

    async fn list_adapters(&self) -> Result<pb::ListAdaptersResponse, ClientError> {
        self.all(|mut c| async move { c.list_adapters(pb::ListAdaptersRequest {}).await })
            .await
    }
}
