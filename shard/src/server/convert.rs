//! Conversions between the `medley.shard.v1` messages of the model calls and the engine's own
//! types ([`crate::engine`]): the only place they meet.

use medley_proto::shard::v1 as pb;

use crate::engine::{
    AdapterSlotInfo, Batch, CachedBatch, FinishReason, GeneratedText, Generation, Request,
    SamplingParams, ShardInfo, StepResponse, StepTimings, StopParams, Tokens, WarmupParams,
    WarmupResult,
};

/// Maps a proto3 field left at its default 0 to the neutral value `neutral`.
fn unset_to(value: f32, neutral: f32) -> f32 {
    if value == 0.0 { neutral } else { value }
}

impl From<&pb::NextTokenChooserParameters> for SamplingParams {
    /// proto3 cannot tell "unset" from 0, and the router never sends 0 for `top_p`,
    /// `typical_p` or `repetition_penalty` (it rejects them), so a 0 there means "off" and
    /// becomes the neutral 1. `temperature` keeps 0, which means greedy (the proto's own
    /// comment: "0 or 1 with do_sample = false and no other warper means greedy"). Range
    /// checks happen in [`crate::generation::Sampler::new`].
    fn from(p: &pb::NextTokenChooserParameters) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: unset_to(p.top_p, 1.0),
            typical_p: unset_to(p.typical_p, 1.0),
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: unset_to(p.repetition_penalty, 1.0),
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        }
    }
}

impl From<pb::NextTokenChooserParameters> for SamplingParams {
    /// See the conversion from a reference.
    fn from(p: pb::NextTokenChooserParameters) -> Self {
        Self::from(&p)
    }
}

impl From<&pb::StoppingCriteriaParameters> for StopParams {
    /// Field by field.
    fn from(p: &pb::StoppingCriteriaParameters) -> Self {
        Self {
            max_new_tokens: p.max_new_tokens,
            stop_sequences: p.stop_sequences.clone(),
            ignore_eos_token: p.ignore_eos_token,
        }
    }
}

impl From<pb::StoppingCriteriaParameters> for StopParams {
    /// Field by field, without copying the stop strings.
    fn from(p: pb::StoppingCriteriaParameters) -> Self {
        Self {
            max_new_tokens: p.max_new_tokens,
            stop_sequences: p.stop_sequences,
            ignore_eos_token: p.ignore_eos_token,
        }
    }
}

impl From<pb::Request> for Request {
    /// Absent parameter messages read as their defaults (all zeros), converted as above: the
    /// sampling parameters of greedy decoding, and `max_new_tokens = 0`, which the engine
    /// refuses.
    fn from(r: pb::Request) -> Self {
        Self {
            id: r.id,
            input_ids: r.input_ids,
            sampling: SamplingParams::from(r.parameters.unwrap_or_default()),
            stopping: StopParams::from(r.stopping_parameters.unwrap_or_default()),
            prefill_logprobs: r.prefill_logprobs,
            top_n_tokens: r.top_n_tokens,
            adapter_slot: r.adapter_slot,
        }
    }
}

impl From<pb::Batch> for Batch {
    /// The requests in order; the redundant `size` is dropped.
    fn from(b: pb::Batch) -> Self {
        Self {
            id: b.id,
            requests: b.requests.into_iter().map(Request::from).collect(),
            max_tokens: b.max_tokens,
        }
    }
}

impl From<pb::CachedBatch> for CachedBatch {
    /// Field by field.
    fn from(b: pb::CachedBatch) -> Self {
        Self {
            id: b.id,
            request_ids: b.request_ids,
            size: b.size,
            max_tokens: b.max_tokens,
            current_tokens: b.current_tokens,
            pending_tokens: b.pending_tokens,
            preempted: b.preempted,
            queued: b.queued,
            prefilling: b.prefilling,
        }
    }
}

impl From<CachedBatch> for pb::CachedBatch {
    /// Field by field.
    fn from(b: CachedBatch) -> Self {
        Self {
            id: b.id,
            request_ids: b.request_ids,
            size: b.size,
            max_tokens: b.max_tokens,
            current_tokens: b.current_tokens,
            pending_tokens: b.pending_tokens,
            preempted: b.preempted,
            queued: b.queued,
            prefilling: b.prefilling,
        }
    }
}

impl From<&pb::WarmupRequest> for WarmupParams {
    /// The warm-up batch is not used: the engine builds its own worst-case prefill.
    fn from(r: &pb::WarmupRequest) -> Self {
        Self {
            max_input_tokens: r.max_input_tokens,
            max_prefill_tokens: r.max_prefill_tokens,
            max_idle_prefill_tokens: r.max_idle_prefill_tokens,
            max_total_tokens: r.max_total_tokens,
        }
    }
}

impl From<WarmupResult> for pb::WarmupResponse {
    /// Field by field.
    fn from(r: WarmupResult) -> Self {
        Self {
            max_supported_total_tokens: r.max_supported_total_tokens,
        }
    }
}

impl From<ShardInfo> for pb::InfoResponse {
    /// Field by field.
    fn from(i: ShardInfo) -> Self {
        Self {
            model_id: i.model_id,
            dtype: i.dtype.to_string(),
            device_type: i.device_type.to_string(),
            rank: i.rank,
            world_size: i.world_size,
            vocab_size: i.vocab_size,
            max_position_embeddings: i.max_position_embeddings,
            eos_token_ids: i.eos_token_ids,
            kv_cache_tokens: i.kv_cache_tokens,
            adapter_memory_bytes: i.adapter_memory_bytes,
            max_adapter_slots: i.max_adapter_slots,
            kv_block_tokens: i.kv_block_tokens,
        }
    }
}

impl From<Tokens> for pb::Tokens {
    /// Field by field.
    fn from(t: Tokens) -> Self {
        Self {
            ids: t.ids,
            logprobs: t.logprobs,
            texts: t.texts,
            is_special: t.is_special,
        }
    }
}

impl From<FinishReason> for pb::FinishReason {
    /// Variant by variant (the engine never reports `Unspecified`).
    fn from(f: FinishReason) -> Self {
        match f {
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::EosToken => pb::FinishReason::EosToken,
            FinishReason::StopSequence => pb::FinishReason::StopSequence,
        }
    }
}

impl From<GeneratedText> for pb::GeneratedText {
    /// Field by field.
    fn from(g: GeneratedText) -> Self {
        Self {
            text: g.text,
            generated_tokens: g.generated_tokens,
            finish_reason: pb::FinishReason::from(g.finish_reason) as i32,
            seed: g.seed,
        }
    }
}

impl From<Generation> for pb::Generation {
    /// Field by field; `tokens` is always set.
    fn from(g: Generation) -> Self {
        Self {
            request_id: g.request_id,
            prefill_tokens: g.prefill_tokens.map(pb::Tokens::from),
            tokens: Some(g.tokens.into()),
            generated_text: g.generated_text.map(pb::GeneratedText::from),
            top_tokens: g.top_tokens.into_iter().map(pb::Tokens::from).collect(),
            cached_tokens: g.cached_tokens,
        }
    }
}

impl From<StepTimings> for pb::Timings {
    /// Field by field.
    fn from(t: StepTimings) -> Self {
        Self {
            forward_ns: t.forward_ns,
            comm_ns: t.comm_ns,
            launch_ns: t.launch_ns,
            decode_ns: t.decode_ns,
            total_ns: t.total_ns,
        }
    }
}

impl From<crate::kv_cache::KvStats> for pb::KvStats {
    /// Field by field (evictions are the shard's own counter).
    fn from(k: crate::kv_cache::KvStats) -> Self {
        Self {
            block_tokens: k.block_tokens as u32,
            total_blocks: k.total_blocks as u32,
            used_blocks: k.used_blocks as u32,
            cached_blocks: k.cached_blocks as u32,
        }
    }
}

/// The parts of a prefill or decode response, in wire form.
type StepParts = (
    Vec<pb::Generation>,
    Option<pb::CachedBatch>,
    Option<pb::Timings>,
    Option<pb::KvStats>,
);

/// Splits a step response into its wire parts.
fn step_parts(r: StepResponse) -> StepParts {
    (
        r.generations
            .into_iter()
            .map(pb::Generation::from)
            .collect(),
        r.batch.map(pb::CachedBatch::from),
        Some(r.timings.into()),
        Some(r.kv.into()),
    )
}

impl From<StepResponse> for pb::PrefillResponse {
    /// Field by field; `timings` is always set.
    fn from(r: StepResponse) -> Self {
        let (generations, batch, timings, kv) = step_parts(r);
        Self {
            generations,
            batch,
            timings,
            kv,
        }
    }
}

impl From<StepResponse> for pb::DecodeResponse {
    /// Field by field; `timings` is always set.
    fn from(r: StepResponse) -> Self {
        let (generations, batch, timings, kv) = step_parts(r);
        Self {
            generations,
            batch,
            timings,
            kv,
        }
    }
}

impl From<AdapterSlotInfo> for pb::AdapterSlot {
    /// Field by field.
    fn from(s: AdapterSlotInfo) -> Self {
        Self {
            slot: s.slot,
            content_hash: s.content_hash,
            bytes: s.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_zeros_mean_off() {
        let p = SamplingParams::from(pb::NextTokenChooserParameters::default());
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.typical_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.temperature, 0.0);
        assert!(p.validate().is_ok());
        assert!(!p.is_sampling());

        let msg = pb::NextTokenChooserParameters {
            temperature: 0.5,
            top_k: 7,
            top_p: 0.9,
            typical_p: 0.8,
            do_sample: true,
            seed: 42,
            repetition_penalty: 1.2,
            frequency_penalty: 0.1,
            presence_penalty: -0.3,
        };
        let p = SamplingParams::from(&msg);
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.5,
                top_k: 7,
                top_p: 0.9,
                typical_p: 0.8,
                do_sample: true,
                seed: 42,
                repetition_penalty: 1.2,
                frequency_penalty: 0.1,
                presence_penalty: -0.3,
            }
        );
    }

    #[test]
    fn stop_params_convert() {
        let msg = pb::StoppingCriteriaParameters {
            max_new_tokens: 9,
            stop_sequences: vec!["\n\n".into()],
            ignore_eos_token: true,
        };
        let p = StopParams::from(&msg);
        assert_eq!(p, StopParams::from(msg));
        assert_eq!(p.max_new_tokens, 9);
        assert_eq!(p.stop_sequences, vec!["\n\n".to_string()]);
        assert!(p.ignore_eos_token);
    }

    #[test]
    fn requests_without_parameters_read_as_zeros() {
        let batch = Batch::from(pb::Batch {
            id: 3,
            requests: vec![pb::Request {
                id: 7,
                input_ids: vec![1, 2],
                parameters: None,
                stopping_parameters: None,
                prefill_logprobs: true,
                top_n_tokens: 2,
                adapter_slot: 1,
                traceparent: None,
            }],
            size: 1,
            max_tokens: 12,
        });
        assert_eq!((batch.id, batch.max_tokens), (3, 12));
        assert_eq!(
            batch.requests,
            vec![Request {
                id: 7,
                input_ids: vec![1, 2],
                sampling: SamplingParams::from(pb::NextTokenChooserParameters::default()),
                stopping: StopParams::default(),
                prefill_logprobs: true,
                top_n_tokens: 2,
                adapter_slot: 1,
            }]
        );
        assert_eq!(batch.requests[0].stopping.max_new_tokens, 0);
    }

    #[test]
    fn cached_batches_round_trip() {
        let wire = pb::CachedBatch {
            id: 4,
            request_ids: vec![5, 6],
            size: 2,
            max_tokens: 40,
            current_tokens: 9,
            pending_tokens: 3,
            preempted: 1,
            queued: 7,
            prefilling: 1,
        };
        assert_eq!(pb::CachedBatch::from(CachedBatch::from(wire.clone())), wire);
    }

    #[test]
    fn finish_reasons_keep_their_wire_values() {
        for (reason, wire) in [
            (FinishReason::Length, 1),
            (FinishReason::EosToken, 2),
            (FinishReason::StopSequence, 3),
        ] {
            assert_eq!(pb::FinishReason::from(reason) as i32, wire);
        }
    }

    #[test]
    fn step_responses_set_tokens_and_timings() {
        let tokens = |id| Tokens {
            ids: vec![id],
            logprobs: vec![-0.5],
            texts: vec!["a".into()],
            is_special: vec![false],
        };
        let step = StepResponse {
            generations: vec![Generation {
                request_id: 7,
                prefill_tokens: None,
                tokens: tokens(3),
                generated_text: Some(GeneratedText {
                    text: "a".into(),
                    generated_tokens: 1,
                    finish_reason: FinishReason::EosToken,
                    seed: Some(9),
                }),
                top_tokens: vec![tokens(4)],
                cached_tokens: Some(32),
            }],
            batch: None,
            timings: StepTimings {
                forward_ns: 1,
                comm_ns: 3,
                launch_ns: 5,
                decode_ns: 2,
                total_ns: 4,
            },
            kv: crate::kv_cache::KvStats {
                block_tokens: 16,
                total_blocks: 10,
                used_blocks: 4,
                cached_blocks: 2,
                evictions: 1,
            },
        };
        let wire = pb::DecodeResponse::from(step.clone());
        let generation = &wire.generations[0];
        assert_eq!(generation.request_id, 7);
        assert_eq!(
            generation.tokens.as_ref().map(|t| t.ids.clone()),
            Some(vec![3])
        );
        assert_eq!(generation.top_tokens[0].ids, vec![4]);
        assert!(generation.prefill_tokens.is_none());
        assert_eq!(generation.cached_tokens, Some(32));
        let kv = wire.kv.as_ref().expect("kv stats");
        assert_eq!(
            (kv.total_blocks, kv.used_blocks, kv.cached_blocks),
            (10, 4, 2)
        );
        let text = generation.generated_text.as_ref().expect("finished");
        assert_eq!(text.finish_reason(), pb::FinishReason::EosToken);
        assert_eq!((text.generated_tokens, text.seed), (1, Some(9)));
        assert_eq!(
            wire.timings,
            Some(pb::Timings {
                forward_ns: 1,
                comm_ns: 3,
                launch_ns: 5,
                decode_ns: 2,
                total_ns: 4,
            })
        );
        let prefill = pb::PrefillResponse::from(step);
        assert_eq!(prefill.generations, wire.generations);
        assert_eq!((prefill.batch, prefill.timings), (wire.batch, wire.timings));
        assert_eq!(prefill.kv, wire.kv);
    }
}
