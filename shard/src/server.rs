//! The `medley.shard.v1.ShardService` gRPC service: a thin async front of the engine thread,
//! served on a Unix socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use medley_proto::shard::v1 as pb;
use medley_proto::shard::v1::shard_service_server::{ShardService, ShardServiceServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::adapters::{AdapterLoader, LoadPlan};
use crate::engine::EngineHandle;

/// The gRPC service: model calls are forwarded to the engine thread; adapter loads are resolved,
/// read and merged by the [`AdapterLoader`] on worker threads and only installed by the engine.
pub struct ShardServer {
    engine: EngineHandle,
    loader: Arc<AdapterLoader>,
}

impl ShardServer {
    /// Wraps an engine handle and the adapter loader of the same model.
    pub fn new(engine: EngineHandle, loader: Arc<AdapterLoader>) -> Self {
        Self { engine, loader }
    }
}

#[tonic::async_trait]
impl ShardService for ShardServer {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.engine.info().await?))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.engine.health().await?;
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn warmup(
        &self,
        req: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        Ok(Response::new(self.engine.warmup(req.into_inner()).await?))
    }

    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let batch = req
            .into_inner()
            .batch
            .ok_or_else(|| Status::invalid_argument("prefill without a batch"))?;
        Ok(Response::new(self.engine.prefill(batch).await?))
    }

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        Ok(Response::new(
            self.engine.decode(req.into_inner().batches).await?,
        ))
    }

    async fn filter_batch(
        &self,
        req: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.engine.filter(req.batch_id, req.request_ids).await?,
        ))
    }

    async fn clear_cache(
        &self,
        req: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.engine.clear(req.into_inner().id).await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn load_adapter(
        &self,
        req: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let req = req.into_inner();
        let plan = LoadPlan::from_proto(req.spec)?;
        // The slot is checked once more when the engine installs the adapter; failing early
        // saves the work of a load that cannot be installed.
        let max = self.loader.max_slots();
        if req.slot == 0 || req.slot > max {
            return Err(crate::adapters::AdapterError::BadSlot {
                slot: req.slot,
                max,
            }
            .into());
        }
        let prepared = self.loader.prepare(plan).await?;
        let report = self
            .engine
            .install_adapter(req.slot, prepared.adapter)
            .await?;
        Ok(Response::new(pb::LoadAdapterResponse {
            bytes: report.bytes,
            rank: report.rank,
            content_hash: report.content_hash,
            load_ns: prepared.load_ns,
            merge_ns: prepared.merge_ns,
        }))
    }

    async fn offload_adapter(
        &self,
        req: Request<pb::OffloadAdapterRequest>,
    ) -> Result<Response<pb::OffloadAdapterResponse>, Status> {
        self.engine.offload_adapter(req.into_inner().slot).await?;
        Ok(Response::new(pb::OffloadAdapterResponse {}))
    }

    async fn list_adapters(
        &self,
        _: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        Ok(Response::new(pb::ListAdaptersResponse {
            slots: self.engine.list_adapters().await?,
        }))
    }
}

/// Removes the socket file on drop.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves `server` on the Unix socket `path` until `shutdown` resolves. A stale socket file
/// from an earlier run is replaced; the file is removed on exit.
pub async fn serve_uds(
    server: ShardServer,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| ServeError::Bind(path.to_path_buf(), e))?;
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| ServeError::Bind(path.to_path_buf(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| ServeError::Bind(path.to_path_buf(), e))?;
    let _guard = SocketGuard(path.to_path_buf());
    tracing::info!(socket = %path.display(), "shard serving");
    tonic::transport::Server::builder()
        .add_service(
            ShardServiceServer::new(server)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Transport)
}

/// Errors of the shard server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("cannot bind {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// tonic failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}
