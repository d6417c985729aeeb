//! Conversions between `medley.v1` messages and the internal request/response forms.

use medley_proto::v1 as pb;

use crate::infer::{
    FinishReason, GenerateOutput, GenerateParameters, GenerateRequest, GeneratedText,
    MergedAdapters, PrefillToken, ResponseOptions, Token,
};

/// A merge from the wire (repeated fields are always present there).
pub(super) fn merged_from_proto(m: pb::MergedAdapters) -> MergedAdapters {
    MergedAdapters {
        ids: Some(m.ids),
        weights: Some(m.weights),
        merge_strategy: m.merge_strategy,
        density: m.density,
        majority_sign_method: m.majority_sign_method,
        seed: m.seed,
        svd_rank: m.svd_rank,
        svd_clamp: m.svd_clamp,
    }
}

/// A merge for the wire.
pub(super) fn merged_to_proto(m: MergedAdapters) -> pb::MergedAdapters {
    pb::MergedAdapters {
        ids: m.ids.unwrap_or_default(),
        weights: m.weights.unwrap_or_default(),
        merge_strategy: m.merge_strategy,
        density: m.density,
        majority_sign_method: m.majority_sign_method,
        seed: m.seed,
        svd_rank: m.svd_rank,
        svd_clamp: m.svd_clamp,
    }
}

/// The internal request of a gRPC request. Proto3 scalars without `optional` (the booleans and
/// `stop`) always have a value; `optional` fields keep their presence.
pub(super) fn request(r: pb::GenerateRequest) -> GenerateRequest {
    let p = r.parameters.unwrap_or_default();
    GenerateRequest {
        inputs: r.inputs,
        parameters: GenerateParameters {
            adapter_id: p.adapter_id,
            adapter_source: p.adapter_source,
            merged_adapters: p.merged_adapters.map(merged_from_proto),
            api_token: p.api_token,
            do_sample: Some(p.do_sample),
            max_new_tokens: p.max_new_tokens,
            ignore_eos_token: Some(p.ignore_eos_token),
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            return_full_text: Some(p.return_full_text),
            stop: Some(p.stop),
            seed: p.seed,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            truncate: p.truncate,
            typical_p: p.typical_p,
            best_of: None,
            watermark: None,
            details: Some(p.details),
            decoder_input_details: Some(p.decoder_input_details),
            return_k_alternatives: p.return_k_alternatives,
            response_format: None,
        },
    }
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::EosToken => pb::FinishReason::EosToken,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
    }
}

/// A generated token and its alternatives (kept only when `alternatives`).
pub(super) fn token(t: Token, top_tokens: Vec<Token>, alternatives: bool) -> pb::Token {
    pb::Token {
        id: t.id,
        text: t.text,
        logprob: t.logprob,
        special: t.special,
        alternative_tokens: if alternatives {
            top_tokens
                .into_iter()
                .map(|a| pb::AlternativeToken {
                    id: a.id,
                    text: a.text,
                    logprob: a.logprob,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn input_token(t: PrefillToken) -> pb::InputToken {
    pb::InputToken {
        id: t.id,
        text: t.text,
        logprob: t.logprob,
    }
}

/// The response of a finished generation, shaped as asked.
pub(super) fn response(out: GenerateOutput, opts: ResponseOptions) -> pb::GenerateResponse {
    let details = opts.details.then(|| pb::Details {
        finish_reason: finish_reason(out.generated_text.finish_reason) as i32,
        prompt_tokens: out.meta.input_length,
        generated_tokens: out.generated_text.generated_tokens,
        seed: out.generated_text.seed,
        prefill: if opts.decoder_input_details {
            out.prefill.into_iter().map(input_token).collect()
        } else {
            Vec::new()
        },
        tokens: out
            .tokens
            .into_iter()
            .zip(out.top_tokens)
            .map(|(t, top)| token(t, top, opts.alternatives))
            .collect(),
        cached_tokens: out.cached_tokens,
    });
    pb::GenerateResponse {
        generated_text: out.generated_text.text,
        details,
    }
}

/// Details of the last streamed message: `prompt_tokens`, `cached_tokens` of them from the
/// prefix cache.
pub(super) fn stream_details(
    g: &GeneratedText,
    prompt_tokens: u32,
    cached_tokens: Option<u32>,
) -> pb::StreamDetails {
    pb::StreamDetails {
        finish_reason: finish_reason(g.finish_reason) as i32,
        prompt_tokens,
        generated_tokens: g.generated_tokens,
        seed: g.seed,
        cached_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_parameters_keep_presence() {
        let r = request(pb::GenerateRequest {
            inputs: "hi".into(),
            parameters: Some(pb::GenerateParameters {
                top_k: Some(3),
                stop: vec!["x".into()],
                merged_adapters: Some(pb::MergedAdapters {
                    ids: vec!["a".into()],
                    weights: vec![1.0],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        let p = &r.parameters;
        assert_eq!(p.top_k, Some(3));
        assert_eq!(p.temperature, None);
        assert_eq!(p.stop, Some(vec!["x".to_string()]));
        assert_eq!(p.do_sample, Some(false));
        assert_eq!(
            p.merged_adapters.as_ref().and_then(|m| m.ids.clone()),
            Some(vec!["a".to_string()])
        );
        // No parameters at all means defaults.
        let empty = request(pb::GenerateRequest {
            inputs: "hi".into(),
            parameters: None,
        });
        assert_eq!(empty.parameters.max_new_tokens, None);
    }
}
