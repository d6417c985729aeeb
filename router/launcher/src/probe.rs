//! Shard readiness: the socket file exists and a `medley.shard.v1.ShardService/Health` RPC over
//! it succeeds.

use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use medley_proto::shard::v1::HealthRequest;
use medley_proto::shard::v1::shard_service_client::ShardServiceClient;

/// Decides whether the shard listening on a socket path is ready.
pub trait ReadinessProbe: Send + Sync {
    /// True when the shard behind `uds_path` answers. Must return within a bounded time.
    fn is_ready<'a>(&'a self, uds_path: &'a Path) -> BoxFuture<'a, bool>;
}

/// The production probe: the `Health` RPC over the Unix socket.
#[derive(Debug, Clone)]
pub struct HealthRpcProbe {
    /// Limit on connecting plus the RPC.
    pub timeout: Duration,
}

impl Default for HealthRpcProbe {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

impl ReadinessProbe for HealthRpcProbe {
    fn is_ready<'a>(&'a self, uds_path: &'a Path) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if !uds_path.exists() {
                return false;
            }
            match tokio::time::timeout(self.timeout, health_rpc(uds_path)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::debug!(socket = %uds_path.display(), error = %e, "shard not ready yet");
                    false
                }
                Err(_) => {
                    tracing::debug!(socket = %uds_path.display(), "shard health check timed out");
                    false
                }
            }
        })
    }
}

/// One `Health` call over `uds_path`.
async fn health_rpc(uds_path: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = medley_router::backend::client::connect_uds(uds_path).await?;
    ShardServiceClient::new(channel)
        .health(HealthRequest {})
        .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use medley_proto::shard::v1 as pb;
    use medley_proto::shard::v1::shard_service_server::{ShardService, ShardServiceServer};
    use tonic::{Request, Response, Status};

    use super::*;

    /// A shard that only answers `Health`.
    struct HealthOnly;

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("fake shard"))
    }

    #[tonic::async_trait]
    impl ShardService for HealthOnly {
        async fn info(
            &self,
            _: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::InfoResponse>, Status> {
            unimplemented()
        }
        async fn health(
            &self,
            _: Request<pb::HealthRequest>,
        ) -> Result<Response<pb::HealthResponse>, Status> {
            Ok(Response::new(pb::HealthResponse { instance: 1 }))
        }
        async fn warmup(
            &self,
            _: Request<pb::WarmupRequest>,
        ) -> Result<Response<pb::WarmupResponse>, Status> {
            unimplemented()
        }
        async fn prefill(
            &self,
            _: Request<pb::PrefillRequest>,
        ) -> Result<Response<pb::PrefillResponse>, Status> {
            unimplemented()
        }
        async fn decode(
            &self,
            _: Request<pb::DecodeRequest>,
        ) -> Result<Response<pb::DecodeResponse>, Status> {
            unimplemented()
        }
        async fn filter_batch(
            &self,
            _: Request<pb::FilterBatchRequest>,
        ) -> Result<Response<pb::FilterBatchResponse>, Status> {
            unimplemented()
        }
        async fn clear_cache(
            &self,
            _: Request<pb::ClearCacheRequest>,
        ) -> Result<Response<pb::ClearCacheResponse>, Status> {
            unimplemented()
        }
        async fn prepare_adapter(
            &self,
            _: Request<pb::PrepareAdapterRequest>,
        ) -> Result<Response<pb::PrepareAdapterResponse>, Status> {
            unimplemented()
        }
        async fn install_adapter(
            &self,
            _: Request<pb::InstallAdapterRequest>,
        ) -> Result<Response<pb::InstallAdapterResponse>, Status> {
            unimplemented()
        }
        async fn discard_adapter(
            &self,
            _: Request<pb::DiscardAdapterRequest>,
        ) -> Result<Response<pb::DiscardAdapterResponse>, Status> {
            unimplemented()
        }
        async fn offload_adapter(
            &self,
            _: Request<pb::OffloadAdapterRequest>,
        ) -> Result<Response<pb::OffloadAdapterResponse>, Status> {
            unimplemented()
        }
        async fn list_adapters(
            &self,
            _: Request<pb::ListAdaptersRequest>,
        ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
            unimplemented()
        }
    }

    /// Serves [`HealthOnly`] on `path` until the task is aborted.
    pub(crate) fn serve_health_only(path: &Path) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(path).expect("bind uds");
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(ShardServiceServer::new(HealthOnly))
                .serve_with_incoming(incoming)
                .await;
        })
    }

    #[tokio::test]
    async fn ready_when_health_answers() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("shard-0");
        let probe = HealthRpcProbe::default();
        assert!(!probe.is_ready(&path).await, "no socket yet");
        let server = serve_health_only(&path);
        assert!(probe.is_ready(&path).await);
        server.abort();
    }

    #[tokio::test]
    async fn not_ready_for_plain_files_or_silent_sockets() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").expect("write");
        let probe = HealthRpcProbe {
            timeout: Duration::from_millis(500),
        };
        assert!(!probe.is_ready(&file).await);
        // A socket that accepts but never speaks HTTP/2 must not hang the probe.
        let silent = tmp.path().join("silent");
        let listener = tokio::net::UnixListener::bind(&silent).expect("bind");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        assert!(!probe.is_ready(&silent).await);
        hold.abort();
    }
}
