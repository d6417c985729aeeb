//! [`Guarded`]: the shard calls of one [`super::ShardBackend`], bound to the shard processes it
//! set up. A failed call is checked against them ([`Guarded::lost`]): when they are gone or were
//! replaced, the backend's tripwire fires, every call ends at once, and the failure counts as
//! UNAVAILABLE, never as a bad request. So no request waits on a shard that will never answer,
//! and no request carries a slot or batch of the old processes to new ones for long.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medley_proto::shard::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::client::ClientError;
use super::shard_api::ShardApi;

/// How long a health check after a failed call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Fires once, with the first reason, when the backend must stop.
#[derive(Default)]
struct Tripwire {
    token: CancellationToken,
    reason: Mutex<Option<String>>,
}

/// The shard calls of one backend (see the module docs). Clones share the tripwire.
#[derive(Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    /// The shard processes this backend set up ([`super::client::group_instance`]).
    instance: u64,
    wire: Arc<Tripwire>,
}

impl<S: ShardApi> Guarded<S> {
    /// Guards calls to `inner`, whose processes answer health checks with `instance`.
    pub fn new(inner: S, instance: u64) -> Self {
        Self {
            inner,
            instance,
            wire: Arc::default(),
        }
    }

    /// The processes this backend set up.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Fires the tripwire: calls in flight and later calls fail with [`ClientError::Stopped`].
    pub fn trip(&self, reason: impl Into<String>) {
        let mut first = self.wire.reason.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| reason.into());
        self.wire.token.cancel();
    }

    /// Why the tripwire fired, once it has.
    pub fn tripped(&self) -> Option<String> {
        self.wire.token.is_cancelled().then(|| {
            self.wire
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "the backend was stopped".into())
        })
    }

    /// Resolves when the tripwire fires.
    pub async fn until_tripped(&self) {
        self.wire.token.cancelled().await;
    }

    /// After a failed call: true when the shards are gone, broken or replaced by new processes
    /// (the tripwire then fires), so the failure is the shards' and not the request's.
    pub async fn lost(&self, e: &ClientError) -> bool {
        if self.wire.token.is_cancelled() {
            return true;
        }
        let reason = if e.is_unavailable() {
            Some(e.to_string())
        } else {
            match tokio::time::timeout(PROBE_TIMEOUT, self.inner.health()).await {
                Ok(Ok(instance)) if instance == self.instance => None,
                Ok(Ok(_)) => Some("a shard was restarted".to_string()),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("a shard did not answer a health check".to_string()),
            }
        };
        match reason {
            Some(reason) => {
                self.trip(reason);
                true
            }
            None => false,
        }
    }

    async fn guard<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::select! {
            biased;
            _ = self.wire.token.cancelled() => Err(ClientError::Stopped),
            result = call => result,
        }
    }
}

impl<S: ShardApi> ShardApi for Guarded<S> {
    async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        self.guard(self.inner.info()).await
    }

    async fn health(&self) -> Result<u64, ClientError> {
        self.guard(self.inner.health()).await
    }

    async fn warmup(&self, req: pb::WarmupRequest) -> Result<u64, ClientError> {
        self.guard(self.inner.warmup(req)).await
    }

    async fn prefill(
        &self,
        batch: pb::Batch,
        running: Vec<pb::CachedBatch>,
    ) -> Result<pb::PrefillResponse, ClientError> {
        self.guard(self.inner.prefill(batch, running)).await
    }

    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
    ) -> Result<pb::DecodeResponse, ClientError> {
        self.guard(self.inner.decode(batches)).await
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        self.guard(self.inner.filter_batch(batch_id, request_ids))
            .await
    }

    async fn clear_cache(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.guard(self.inner.clear_cache(id)).await
    }

    async fn prepare_adapter(
        &self,
        req: pb::PrepareAdapterRequest,
    ) -> Result<pb::PrepareAdapterResponse, ClientError> {
        self.guard(self.inner.prepare_adapter(req)).await
    }

    async fn install_adapter(
        &self,
        id: u64,
        slot: u32,
    ) -> Result<pb::InstallAdapterResponse, ClientError> {
        self.guard(self.inner.install_adapter(id, slot)).await
    }

    async fn discard_adapter(&self, id: Option<u64>) -> Result<(), ClientError> {
        self.guard(self.inner.discard_adapter(id)).await
    }

    async fn offload_adapter(&self, slot: u32) -> Result<(), ClientError> {
        self.guard(self.inner.offload_adapter(slot)).await
    }

    async fn list_adapters(&self) -> Result<pb::ListAdaptersResponse, ClientError> {
        self.guard(self.inner.list_adapters()).await
    }
}
