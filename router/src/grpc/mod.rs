//! The public gRPC front: `medley.v1.GenerationService` (Generate, GenerateStream, Info) and
//! `medley.v1.MergeService` (named merges, `merges`) and `medley.v1.AdapterService` (adapter
//! management, `adapters`), with
//! the same validation and messages as HTTP (errors are statuses with
//! [`crate::error::InferError::grpc_code`]). The standard health and reflection services are
//! assembled in [`crate::server`].
//!
//! `Generate` and `GenerateStream` run in a server span that continues the caller's W3C
//! `traceparent` metadata ([`crate::telemetry`]).
//!
//! A client that cancels `GenerateStream` makes tonic drop the response stream, which drops the
//! request's [`crate::infer::GenerateStream`] and with it the backend receiver.

mod adapters;
mod convert;
mod merges;
#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt, future};
use medley_proto::v1 as pb;
use medley_proto::v1::generation_service_server::GenerationService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub use adapters::AdapterGrpc;
pub use medley_proto::v1::generation_service_server::GenerationServiceServer;
pub use merges::MergeGrpc;

use crate::config::RouterConfig;
use crate::infer::{Infer, InferStreamResponse};

/// Implementation of `medley.v1.GenerationService`.
#[derive(Clone)]
pub struct GenerationGrpc {
    infer: Infer,
    config: Arc<RouterConfig>,
}

impl GenerationGrpc {
    /// A service over `infer`; `config` feeds `Info`.
    pub fn new(infer: Infer, config: Arc<RouterConfig>) -> Self {
        Self { infer, config }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> GenerationServiceServer<Self> {
        GenerationServiceServer::new(self)
    }
}

/// The message stream of `GenerateStream`.
pub type GenerateStreamResponses =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GenerationService for GenerationGrpc {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let span = crate::telemetry::grpc_server_span("Generate", request.metadata());
        async move {
            let request = convert::request(request.into_inner());
            let opts = request.parameters.response_options();
            let out = self.infer.generate(request).await?;
            Ok(Response::new(convert::response(out, opts)))
        }
        .instrument(span)
        .await
    }

    type GenerateStreamStream = GenerateStreamResponses;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let span = crate::telemetry::grpc_server_span("GenerateStream", request.metadata());
        let request = convert::request(request.into_inner());
        let opts = request.parameters.response_options();
        let generation = self.infer.generate_stream(request).instrument(span).await?;
        let prompt_tokens = generation.meta().input_length;
        let messages = generation.filter_map(move |item| {
            future::ready(match item {
                Ok(InferStreamResponse::Prefill(_)) => None,
                Ok(InferStreamResponse::Intermediate { token, top_tokens }) => {
                    Some(Ok(pb::GenerateStreamResponse {
                        token: Some(convert::token(token, top_tokens, opts.alternatives)),
                        generated_text: None,
                        details: None,
                    }))
                }
                Ok(InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    cached_tokens,
                    ..
                }) => Some(Ok(pb::GenerateStreamResponse {
                    token: Some(convert::token(token, top_tokens, opts.alternatives)),
                    details: opts.details.then(|| {
                        convert::stream_details(&generated_text, prompt_tokens, cached_tokens)
                    }),
                    generated_text: Some(generated_text.text),
                })),
                Err(e) => Some(Err(Status::from(e))),
            })
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let backend = self.infer.backend_info();
        let l = &self.config.limits;
        Ok(Response::new(pb::InfoResponse {
            model_id: self.config.model_id.clone(),
            model_dtype: backend.model_dtype,
            model_device_type: backend.model_device_type,
            max_input_length: l.max_input_length,
            max_total_tokens: l.max_total_tokens,
            max_concurrent_requests: u32::try_from(l.max_concurrent_requests).unwrap_or(u32::MAX),
            max_stop_sequences: u32::try_from(l.max_stop_sequences).unwrap_or(u32::MAX),
            max_new_tokens_default: l.default_max_new_tokens,
            world_size: backend.world_size,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}
