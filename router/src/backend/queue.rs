//! A queued request ([`Entry`]), the budgets of one batch ([`BatchBudget`]) and the shard's
//! view of a request. The batch builder itself belongs to the registry
//! (`registry::take`), which owns the queues.

use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;

use super::scheduler::AdapterLease;
use crate::error::InferError;
use crate::infer::{InferStreamResponse, ValidGenerateRequest};
use crate::telemetry::RequestTrace;

/// A request with the channel its events go to.
pub(crate) struct Entry {
    /// The validated request.
    pub request: ValidGenerateRequest,
    /// Where its events go; closed when the client went away.
    pub response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    /// When it was queued.
    pub queued: Instant,
    /// When its prefill started.
    pub batch_time: Option<Instant>,
    /// Pins its adapter while it runs (None for the base model and while queued).
    pub lease: Option<AdapterLease>,
    /// Its spans (queue, adapter wait, prefill, decode); they end when the entry is dropped.
    pub trace: RequestTrace,
    /// True once its first token arrived: its prefill (over one or several steps) is done.
    pub started: bool,
    /// Prompt tokens the shards took from their prefix cache (known with the first token, when
    /// the shards report it).
    pub cached_tokens: Option<u32>,
}

impl Entry {
    /// A queued entry; its spans start under the current span (the request's).
    pub fn new(
        request: ValidGenerateRequest,
        response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    ) -> Self {
        Self {
            request,
            response_tx,
            queued: Instant::now(),
            batch_time: None,
            lease: None,
            trace: RequestTrace::enqueued(),
            started: false,
            cached_tokens: None,
        }
    }

    /// Tokens this request may hold in the KV cache.
    pub fn max_tokens(&self) -> u32 {
        self.request.input_length() + self.request.stopping_parameters.max_new_tokens
    }
}

/// Budgets for one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchBudget {
    /// Don't form a batch smaller than this (None = any size).
    pub min_size: Option<usize>,
    /// Don't form a batch larger than this.
    pub max_size: Option<usize>,
    /// Prompt tokens the shards may still prefill in the next step. Requests join while some
    /// are left; the last one may have more (the shards prefill the rest in later steps).
    pub prefill_tokens: u32,
    /// Sum of prompt + max new tokens of the batch.
    pub total_tokens: u32,
}

/// The shard's view of a request running on adapter `slot` (0 = base model).
pub(crate) fn to_proto_request(id: u64, r: &ValidGenerateRequest, slot: u32) -> pb::Request {
    let p = &r.parameters;
    let s = &r.stopping_parameters;
    pb::Request {
        id,
        input_ids: r.input_ids.clone(),
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: s.max_new_tokens,
            stop_sequences: s.stop_sequences.clone(),
            ignore_eos_token: s.ignore_eos_token,
        }),
        prefill_logprobs: r.decoder_input_details,
        top_n_tokens: r.top_n_tokens,
        adapter_slot: slot,
        // Filled in by the batching loop when the request's prefill starts.
        traceparent: None,
    }
}
