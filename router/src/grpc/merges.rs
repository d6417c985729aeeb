//! `medley.v1.MergeService`: named merges over gRPC, the same registry and rules as
//! `/v1/merges` ([`crate::merges`]); errors are statuses from [`NamedMergeError`].

use medley_proto::v1 as pb;
use medley_proto::v1::merge_service_server::{MergeService, MergeServiceServer};
use tonic::{Request, Response, Status};

use super::convert::{merged_from_proto, merged_to_proto};
use crate::infer::Infer;
use crate::merges::{MergeDefinition, NamedMerge, NamedMergeError};

/// Implementation of `medley.v1.MergeService`.
#[derive(Clone)]
pub struct MergeGrpc {
    infer: Infer,
}

impl MergeGrpc {
    /// A service over the named merges of `infer`'s validation.
    pub fn new(infer: Infer) -> Self {
        Self { infer }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> MergeServiceServer<Self> {
        MergeServiceServer::new(self)
    }
}

fn to_proto(m: NamedMerge) -> pb::NamedMerge {
    pb::NamedMerge {
        name: m.definition.name,
        merged_adapters: Some(merged_to_proto(m.definition.merged_adapters)),
        adapter_source: m.definition.adapter_source,
        key: m.key,
        created: m.created,
    }
}

#[tonic::async_trait]
impl MergeService for MergeGrpc {
    async fn create_merge(
        &self,
        request: Request<pb::CreateMergeRequest>,
    ) -> Result<Response<pb::NamedMerge>, Status> {
        let r = request.into_inner();
        let merged_adapters = r
            .merged_adapters
            .map(merged_from_proto)
            .ok_or_else(|| Status::invalid_argument("merged_adapters is required"))?;
        let def = MergeDefinition {
            name: r.name,
            merged_adapters,
            adapter_source: r.adapter_source,
        };
        let validation = self.infer.validation();
        let merge = validation
            .merges()
            .register(def, &validation.limits().adapters)?;
        Ok(Response::new(to_proto(merge)))
    }

    async fn list_merges(
        &self,
        _: Request<pb::ListMergesRequest>,
    ) -> Result<Response<pb::ListMergesResponse>, Status> {
        let merges = self.infer.validation().merges().list();
        Ok(Response::new(pb::ListMergesResponse {
            merges: merges.into_iter().map(to_proto).collect(),
        }))
    }

    async fn get_merge(
        &self,
        request: Request<pb::GetMergeRequest>,
    ) -> Result<Response<pb::NamedMerge>, Status> {
        let name = request.into_inner().name;
        let merge = self
            .infer
            .validation()
            .merges()
            .get(&name)
            .ok_or(NamedMergeError::NotFound(name))?;
        Ok(Response::new(to_proto(merge)))
    }

    async fn delete_merge(
        &self,
        request: Request<pb::DeleteMergeRequest>,
    ) -> Result<Response<pb::DeleteMergeResponse>, Status> {
        let name = request.into_inner().name;
        let removed = self.infer.validation().merges().remove(&name)?;
        Ok(Response::new(pb::DeleteMergeResponse {
            name: removed.definition.name,
        }))
    }
}
