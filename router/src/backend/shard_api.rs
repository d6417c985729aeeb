//! [`ShardApi`]: the calls the batching loop and the adapter loader make to the shards of one
//! model. [`super::client::ShardedClient`] implements it over gRPC; tests use an in-memory shard.

use std::future::Future;

use medley_proto::shard::v1 as pb;

use super::client::ClientError;

/// The shards of one model, seen as one: every call reaches every rank, answers come from rank
/// 0 (or are combined where noted).
pub trait ShardApi: Clone + Send + Sync + 'static {
    /// Model facts from rank 0.
    fn info(&self) -> impl Future<Output = Result<pb::InfoResponse, ClientError>> + Send;

    /// Health of every rank; the answer identifies the processes (see
    /// [`super::client::group_instance`]): it changes when a shard restarts.
    fn health(&self) -> impl Future<Output = Result<u64, ClientError>> + Send;

    /// Warms up every rank; returns the smallest KV capacity in tokens.
    fn warmup(
        &self,
        req: pb::WarmupRequest,
    ) -> impl Future<Output = Result<u64, ClientError>> + Send;

    /// One step that starts the new `batch` (its prompts, within the shards' per-step prompt
    /// budget: longer ones continue in later steps) and decodes the `running` cached batches
    /// merged with it. The answer's batch is the merged one (the first running batch's id, or
    /// the new batch's when none runs); generations come only for requests that produced a
    /// token in this step.
    fn prefill(
        &self,
        batch: pb::Batch,
        running: Vec<pb::CachedBatch>,
    ) -> impl Future<Output = Result<pb::PrefillResponse, ClientError>> + Send;

    /// One step over the cached batches (concatenated by the shard): running requests decode,
    /// chunked or preempted prompts continue their prefill.
    fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
    ) -> impl Future<Output = Result<pb::DecodeResponse, ClientError>> + Send;

    /// Keeps only `request_ids` of a cached batch.
    fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> impl Future<Output = Result<Option<pb::CachedBatch>, ClientError>> + Send;

    /// Drops one cached batch, or all of them.
    fn clear_cache(&self, id: Option<u64>) -> impl Future<Output = Result<(), ClientError>> + Send;

    /// Reads an adapter (or computes a merge) on every rank and stages it under `req.id`; the
    /// answer carries the largest byte count over the ranks (what the router budgets with).
    fn prepare_adapter(
        &self,
        req: pb::PrepareAdapterRequest,
    ) -> impl Future<Output = Result<pb::PrepareAdapterResponse, ClientError>> + Send;

    /// Moves staged adapter `id` into `slot` on every rank (the router checked the budget).
    fn install_adapter(
        &self,
        id: u64,
        slot: u32,
    ) -> impl Future<Output = Result<pb::InstallAdapterResponse, ClientError>> + Send;

    /// Drops staged adapter `id` (or every staged adapter) on every rank.
    fn discard_adapter(
        &self,
        id: Option<u64>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;

    /// Frees a slot on every rank.
    fn offload_adapter(&self, slot: u32) -> impl Future<Output = Result<(), ClientError>> + Send;

    /// The occupied slots of rank 0.
    fn list_adapters(
        &self,
    ) -> impl Future<Output = Result<pb::ListAdaptersResponse, ClientError>> + Send;
}
