//! The request form both fronts produce: the REST JSON body deserializes straight into it, and the
//! gRPC handler converts its protobuf message into it. Every parameter is optional (JSON `null`
//! and a missing key mean the same thing) and unknown keys are ignored; validation resolves the
//! defaults.

pub use medley_spec::MergedAdapters;
use serde::Deserialize;

/// A generation request before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub inputs: String,
    /// Generation parameters as received.
    pub parameters: GenerateParameters,
}

/// Generation parameters as received (LoRAX `GenerateParameters`, every field nullable).
///
/// Integer fields are signed so that negative values reach validation and get a clear message
/// instead of a type error. `Debug` shows `api_token` as `<redacted>`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerateParameters {
    /// Single adapter to apply; empty or `__base_model__` means the base model.
    pub adapter_id: Option<String>,
    /// Where to fetch the adapter (or every adapter of a merge) from: `hub`, `local` or `s3`
    /// (default: `--default-adapter-source`).
    pub adapter_source: Option<String>,
    /// A per-request merge of several adapters.
    pub merged_adapters: Option<MergedAdapters>,
    /// Token for private hub adapters (also `Authorization: Bearer`); part of the adapter's
    /// identity, never logged.
    pub api_token: Option<String>,
    /// Sample instead of taking the most likely token.
    pub do_sample: Option<bool>,
    /// Maximum number of tokens to generate.
    pub max_new_tokens: Option<i64>,
    /// Keep generating after an end-of-sequence token.
    pub ignore_eos_token: Option<bool>,
    /// Repetition penalty (> 0, 1 = off).
    pub repetition_penalty: Option<f32>,
    /// OpenAI-style frequency penalty in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// OpenAI-style presence penalty in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// Prepend the prompt to the generated text.
    pub return_full_text: Option<bool>,
    /// Stop sequences.
    pub stop: Option<Vec<String>>,
    /// Sampling seed; random when absent.
    pub seed: Option<u64>,
    /// Softmax temperature (>= 0; 0 means greedy).
    pub temperature: Option<f32>,
    /// Keep only the `top_k` most likely tokens.
    pub top_k: Option<i64>,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<i64>,
    /// Typical sampling mass in (0, 1).
    pub typical_p: Option<f32>,
    /// Number of sequences to generate and pick from (only 1 is supported).
    pub best_of: Option<i64>,
    /// Watermarking (not supported).
    pub watermark: Option<bool>,
    /// Return per-token details.
    pub details: Option<bool>,
    /// Return the prompt tokens with their logprobs.
    pub decoder_input_details: Option<bool>,
    /// Number of most likely alternatives to return per generated token (TGI's name,
    /// `top_n_tokens`, is accepted too).
    #[serde(alias = "top_n_tokens")]
    pub return_k_alternatives: Option<i64>,
    /// Constrained output format (not supported).
    pub response_format: Option<serde_json::Value>,
}

impl std::fmt::Debug for GenerateParameters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateParameters")
            .field("adapter_id", &self.adapter_id)
            .field("adapter_source", &self.adapter_source)
            .field("merged_adapters", &self.merged_adapters)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("do_sample", &self.do_sample)
            .field("max_new_tokens", &self.max_new_tokens)
            .field("ignore_eos_token", &self.ignore_eos_token)
            .field("repetition_penalty", &self.repetition_penalty)
            .field("frequency_penalty", &self.frequency_penalty)
            .field("presence_penalty", &self.presence_penalty)
            .field("return_full_text", &self.return_full_text)
            .field("stop", &self.stop)
            .field("seed", &self.seed)
            .field("temperature", &self.temperature)
            .field("top_k", &self.top_k)
            .field("top_p", &self.top_p)
            .field("truncate", &self.truncate)
            .field("typical_p", &self.typical_p)
            .field("best_of", &self.best_of)
            .field("watermark", &self.watermark)
            .field("details", &self.details)
            .field("decoder_input_details", &self.decoder_input_details)
            .field("return_k_alternatives", &self.return_k_alternatives)
            .field("response_format", &self.response_format)
            .finish_non_exhaustive()
    }
}

/// How the response to a request should be shaped; read from the parameters before the request
/// is consumed by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseOptions {
    /// Include `details`.
    pub details: bool,
    /// Include the prompt tokens in `details.prefill`.
    pub decoder_input_details: bool,
    /// Include `alternative_tokens` on each token.
    pub alternatives: bool,
}

impl GenerateParameters {
    /// The response shape these parameters ask for.
    pub fn response_options(&self) -> ResponseOptions {
        ResponseOptions {
            details: self.details.unwrap_or(false),
            decoder_input_details: self.decoder_input_details.unwrap_or(false),
            alternatives: self.return_k_alternatives.is_some_and(|k| k > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_missing_and_unknown_keys_are_accepted() {
        let p: GenerateParameters = serde_json::from_str(
            r#"{"temperature": null, "top_k": 5, "unknown_key": [1, 2], "merged_adapters": {"ids": ["a"], "density": null}}"#,
        )
        .unwrap();
        assert_eq!(p.temperature, None);
        assert_eq!(p.top_k, Some(5));
        assert_eq!(p.do_sample, None);
        let m = p.merged_adapters.unwrap();
        assert_eq!(m.ids, Some(vec!["a".to_string()]));
        assert_eq!(m.density, None);
    }

    #[test]
    fn response_options_follow_flags() {
        let p = GenerateParameters {
            details: Some(true),
            return_k_alternatives: Some(2),
            ..Default::default()
        };
        let o = p.response_options();
        assert!(o.details && o.alternatives && !o.decoder_input_details);
        let tgi: GenerateParameters = serde_json::from_str(r#"{"top_n_tokens": 3}"#).unwrap();
        assert_eq!(tgi.return_k_alternatives, Some(3));
        assert_eq!(
            GenerateParameters::default().response_options(),
            ResponseOptions::default()
        );
    }

    #[test]
    fn debug_redacts_the_api_token() {
        let request = GenerateRequest {
            inputs: "hi".into(),
            parameters: GenerateParameters {
                adapter_id: Some("org/a".into()),
                api_token: Some("hf_probe_secret".into()),
                ..Default::default()
            },
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("hf_probe_secret"), "{shown}");
        assert!(
            shown.contains("org/a") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
