//! The `medley.shard.v1.ShardService` gRPC service: a thin async front of the engine thread,
//! served on a Unix socket. Wire messages stop here: `convert` maps them to and from the
//! engine's types.

mod convert;
mod trace;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use medley_proto::shard::v1 as pb;
use medley_proto::shard::v1::shard_service_server::{ShardService, ShardServiceServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::adapters::{AdapterError, AdapterLoader, LoadPlan, SlotAdapter};
use crate::engine::{CachedBatch, EngineHandle, WarmupParams};

/// Most adapters staged at once. The router keeps at most a handful in flight; this only bounds
/// what a misbehaving client could make the shard hold outside the adapter budget.
pub const MAX_STAGED: usize = 64;

/// The gRPC service: model calls are forwarded to the engine thread; adapters are resolved,
/// read and merged by the [`AdapterLoader`] on worker threads, kept staged under the router's id
/// until the router installs them (after planning the byte budget with their reported size),
/// and only swapped into a slot by the engine.
pub struct ShardServer {
    engine: EngineHandle,
    loader: Arc<AdapterLoader>,
    staged: Mutex<HashMap<u64, SlotAdapter>>,
    /// Random per process: a router tells a restarted shard from the one it set up.
    instance: u64,
    /// This shard's rank (an attribute of its spans).
    rank: u32,
}

impl ShardServer {
    /// Wraps an engine handle and the adapter loader of the same model.
    pub fn new(engine: EngineHandle, loader: Arc<AdapterLoader>) -> Self {
        Self {
            engine,
            loader,
            staged: Mutex::new(HashMap::new()),
            instance: instance_id(),
            rank: 0,
        }
    }

    /// Sets the rank its spans report (0 by default).
    pub fn with_rank(mut self, rank: u32) -> Self {
        self.rank = rank;
        self
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SlotAdapter>> {
        // A poisoned lock only means a thread panicked between two map operations.
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A number that differs between processes (and between runs of one pid): the standard
/// library's randomly keyed hasher over the pid and the clock.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    // 0 means "not reported" on the wire.
    h.finish().max(1)
}

#[tonic::async_trait]
impl ShardService for ShardServer {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.engine.info().await?.into()))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.engine.health()?;
        Ok(Response::new(pb::HealthResponse {
            instance: self.instance,
        }))
    }

    async fn warmup(
        &self,
        req: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let params = WarmupParams::from(&req.into_inner());
        Ok(Response::new(self.engine.warmup(params).await?.into()))
    }

    async fn prefill(
        &self,
        req: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let (metadata, _, req) = req.into_parts();
        let batch = req
            .batch
            .ok_or_else(|| Status::invalid_argument("prefill without a batch"))?;
        // One span per request, under the request's trace; they end with the step.
        let spans = trace::prefill_spans(self.rank, &batch, &metadata);
        let running = req.running.into_iter().map(CachedBatch::from).collect();
        let result = self.engine.prefill(batch.into(), running).await;
        trace::finish_step(&spans, &result, |r| r.timings.forward_ns);
        Ok(Response::new(result?.into()))
    }

    async fn decode(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let batches = req
            .into_inner()
            .batches
            .into_iter()
            .map(CachedBatch::from)
            .collect();
        Ok(Response::new(self.engine.decode(batches).await?.into()))
    }

    async fn filter_batch(
        &self,
        req: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let req = req.into_inner();
        let batch = self.engine.filter(req.batch_id, req.request_ids).await?;
        Ok(Response::new(pb::FilterBatchResponse {
            batch: batch.map(pb::CachedBatch::from),
        }))
    }

    async fn clear_cache(
        &self,
        req: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.engine.clear(req.into_inner().id).await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn prepare_adapter(
        &self,
        req: Request<pb::PrepareAdapterRequest>,
    ) -> Result<Response<pb::PrepareAdapterResponse>, Status> {
        let (metadata, _, req) = req.into_parts();
        let span = trace::prepare_span(self.rank, req.id, req.spec.as_ref(), &metadata);
        let prepared = async {
            let spec = medley_spec::wire::spec_from_proto(req.spec)?;
            let plan = LoadPlan::from_spec(spec)?;
            let staged = self.staged().len();
            if staged >= MAX_STAGED {
                return Err(AdapterError::TooManyStaged(staged));
            }
            self.loader.prepare(plan).await
        }
        .instrument(span.clone())
        .await;
        let prepared = match prepared {
            Ok(p) => {
                span.record("bytes", p.adapter.bytes());
                span.record("load_ms", p.load_ns as f64 / 1e6);
                span.record("merge_ms", p.merge_ns as f64 / 1e6);
                p
            }
            Err(e) => {
                trace::failed(&span, &e);
                return Err(e.into());
            }
        };
        let response = pb::PrepareAdapterResponse {
            bytes: prepared.adapter.bytes(),
            rank: prepared.adapter.rank(),
            content_hash: prepared.adapter.content_hash().to_string(),
            load_ns: prepared.load_ns,
            merge_ns: prepared.merge_ns,
        };
        if let Some(old) = self.staged().insert(req.id, prepared.adapter) {
            tracing::warn!(
                id = req.id,
                hash = old.content_hash(),
                "a staged adapter was replaced under the same id"
            );
        }
        Ok(Response::new(response))
    }

    async fn install_adapter(
        &self,
        req: Request<pb::InstallAdapterRequest>,
    ) -> Result<Response<pb::InstallAdapterResponse>, Status> {
        let (metadata, _, req) = req.into_parts();
        let span = trace::install_span(self.rank, req.id, req.slot, &metadata);
        let adapter = self
            .staged()
            .remove(&req.id)
            .ok_or(AdapterError::NotStaged(req.id))
            .inspect_err(|e| trace::failed(&span, e))?;
        let report = self
            .engine
            .install_adapter(req.slot, adapter)
            .instrument(span.clone())
            .await
            .inspect_err(|e| trace::failed(&span, e))?;
        Ok(Response::new(pb::InstallAdapterResponse {
            bytes: report.bytes,
            content_hash: report.content_hash,
        }))
    }

    async fn discard_adapter(
        &self,
        req: Request<pb::DiscardAdapterRequest>,
    ) -> Result<Response<pb::DiscardAdapterResponse>, Status> {
        let mut staged = self.staged();
        match req.into_inner().id {
            Some(id) => {
                staged.remove(&id);
            }
            None => staged.clear(),
        }
        Ok(Response::new(pb::DiscardAdapterResponse {}))
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
        let slots = self.engine.list_adapters().await?;
        Ok(Response::new(pb::ListAdaptersResponse {
            slots: slots.into_iter().map(pb::AdapterSlot::from).collect(),
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
