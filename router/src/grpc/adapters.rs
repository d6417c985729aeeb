//! `medley.v1.AdapterService`: adapter management over gRPC, the same calls and rules as
//! `/v1/adapters` ([`crate::backend::adapters`]); errors are statuses from [`AdminError`].

use medley_proto::v1 as pb;
use medley_proto::v1::adapter_service_server::{AdapterService, AdapterServiceServer};
use medley_spec::{AdapterSelector, MergedAdapters};
use tonic::{Request, Response, Status};

use super::convert::merged_from_proto;
use crate::backend::adapters::{AdapterView, AdminError};
use crate::infer::{AdapterSpec, Infer};

/// Implementation of `medley.v1.AdapterService`.
#[derive(Clone)]
pub struct AdapterGrpc {
    infer: Infer,
}

impl AdapterGrpc {
    /// A service over the backend of `infer`.
    pub fn new(infer: Infer) -> Self {
        Self { infer }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> AdapterServiceServer<Self> {
        AdapterServiceServer::new(self)
    }

    /// The adapter or merge named by request fields.
    fn spec(
        &self,
        adapter_id: Option<&str>,
        adapter_source: Option<&str>,
        merged: Option<&MergedAdapters>,
        api_token: Option<&str>,
    ) -> Result<AdapterSpec, AdminError> {
        self.infer.admin_spec(AdapterSelector {
            adapter_id,
            adapter_source,
            api_token,
            merged_adapters: merged,
        })
    }
}

fn to_proto(v: AdapterView) -> pb::AdapterStatus {
    let (components, merge_strategy) = v.components();
    pb::AdapterStatus {
        key: v.key.hex(),
        kind: v.spec.kind().to_string(),
        adapters: components
            .into_iter()
            .map(|c| pb::AdapterComponent {
                id: c.id,
                source: c.source,
                revision: c.revision,
                weight: c.weight,
            })
            .collect(),
        merge_strategy,
        state: v.state.as_str().to_string(),
        slot: v.slot,
        bytes: v.bytes,
        pinned: v.pinned,
        running: u32::try_from(v.running).unwrap_or(u32::MAX),
        queued: u32::try_from(v.queued).unwrap_or(u32::MAX),
        last_used: v.last_used_unix(),
        error: v.error,
    }
}

#[tonic::async_trait]
impl AdapterService for AdapterGrpc {
    async fn list_adapters(
        &self,
        _request: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let r = self.infer.backend().residency()?;
        Ok(Response::new(pb::ListAdaptersResponse {
            adapters: r.adapters.into_iter().map(to_proto).collect(),
            max_slots: r.max_slots,
            used_slots: r.used_slots,
            budget_bytes: r.budget_bytes,
            used_bytes: r.used_bytes,
        }))
    }

    async fn preload_adapter(
        &self,
        request: Request<pb::PreloadAdapterRequest>,
    ) -> Result<Response<pb::AdapterStatus>, Status> {
        let r = request.into_inner();
        let merged = r.merged_adapters.map(merged_from_proto);
        let spec = self.spec(
            r.adapter_id.as_deref(),
            r.adapter_source.as_deref(),
            merged.as_ref(),
            r.api_token.as_deref(),
        )?;
        tracing::info!(adapter = %spec.ids(), key = %spec.key(), pinned = r.pinned, "preloading adapter");
        let view = self
            .infer
            .backend()
            .preload(spec, r.pinned, r.wait.unwrap_or(true))
            .await?;
        Ok(Response::new(to_proto(view)))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::AdapterStatus>, Status> {
        let r = request.into_inner();
        let key = match r.key {
            Some(key) => key,
            None => {
                let merged = r.merged_adapters.map(merged_from_proto);
                self.spec(
                    r.adapter_id.as_deref(),
                    r.adapter_source.as_deref(),
                    merged.as_ref(),
                    r.api_token.as_deref(),
                )?
                .key()
                .hex()
            }
        };
        let view = self.infer.backend().unload(&key)?;
        tracing::info!(key = %view.key, "adapter unloaded");
        Ok(Response::new(to_proto(view)))
    }
}
