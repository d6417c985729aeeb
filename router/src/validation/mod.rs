//! Validation: parameter checks, tokenization on a pool of blocking workers, truncation and
//! length rules, producing a [`ValidGenerateRequest`] with every default resolved.

mod params;
mod tokenizer;

use std::sync::Arc;

pub use medley_spec::BASE_MODEL_ADAPTER_ID;
pub use tokenizer::{Encoded, TokenSpan};

use crate::affinity;
use crate::config::Limits;
use crate::error::ValidationError;
use crate::infer::{AdapterSpec, GenerateRequest, ValidGenerateRequest, ValidStoppingParameters};
use crate::merges::NamedMerges;
use tokenizer::TokenizerPool;

/// Validates requests against the server's [`Limits`]. Cheap to clone.
#[derive(Clone)]
pub struct Validation {
    inner: Arc<Inner>,
}

struct Inner {
    pool: TokenizerPool,
    limits: Limits,
    merges: NamedMerges,
}

impl Validation {
    /// Starts `limits.validation_workers` tokenizer threads sharing `tokenizer`, with no named
    /// merges.
    pub fn new(tokenizer: tokenizers::Tokenizer, limits: Limits) -> std::io::Result<Self> {
        Self::with_merges(tokenizer, limits, NamedMerges::default())
    }

    /// [`Validation::new`] with a registry of named merges, which requests may name as their
    /// `adapter_id`.
    pub fn with_merges(
        tokenizer: tokenizers::Tokenizer,
        limits: Limits,
        merges: NamedMerges,
    ) -> std::io::Result<Self> {
        let pool = TokenizerPool::new(tokenizer, limits.validation_workers)?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                limits,
                merges,
            }),
        })
    }

    /// The named merges requests may use.
    pub fn merges(&self) -> &NamedMerges {
        &self.inner.merges
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Checks a request and tokenizes its prompt (with special tokens, then truncated to the
    /// last `truncate` tokens when asked).
    pub async fn validate(
        &self,
        request: GenerateRequest,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        self.validate_with(request, true).await
    }

    /// [`Validation::validate`], choosing whether the tokenizer adds its special tokens (BOS...)
    /// to the prompt: `false` for prompts that already carry them, like the output of a chat
    /// template (Hugging Face's `apply_chat_template` tokenizes without them too).
    pub async fn validate_with(
        &self,
        request: GenerateRequest,
        add_special_tokens: bool,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let limits = &self.inner.limits;
        if request.inputs.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        let checked = params::check_parameters(&request.parameters, limits)?;
        let p = &request.parameters;
        let adapter = self.adapter_spec(medley_spec::AdapterSelector {
            adapter_id: p.adapter_id.as_deref(),
            adapter_source: p.adapter_source.as_deref(),
            api_token: p.api_token.as_deref(),
            merged_adapters: p.merged_adapters.as_ref(),
        })?;

        let encoded = self
            .inner
            .pool
            .encode(request.inputs.clone(), add_special_tokens)
            .await?;
        let input_ids = params::truncate_left(encoded.ids, checked.truncate);
        if input_ids.is_empty() {
            return Err(ValidationError::Tokenizer(
                "`inputs` produced no tokens".into(),
            ));
        }
        let input_length = u32::try_from(input_ids.len()).unwrap_or(u32::MAX);
        let max_new_tokens = params::resolve_lengths(input_length, checked.max_new_tokens, limits)?;

        Ok(ValidGenerateRequest {
            inputs: request.inputs,
            input_ids,
            parameters: checked.parameters,
            stopping_parameters: ValidStoppingParameters {
                max_new_tokens,
                stop_sequences: checked.stop_sequences,
                ignore_eos_token: checked.ignore_eos_token,
            },
            decoder_input_details: checked.decoder_input_details,
            top_n_tokens: checked.top_n_tokens,
            adapter,
        })
    }

    /// The weights a request's adapter fields select: the base model, one adapter, or a merge
    /// (an `adapter_id` that names a registered merge stands for that merge's spec; one that is
    /// a merge's digest label, `merge:<digest>`, labels the request's `merged_adapters` or a
    /// named merge with that digest: see [`crate::affinity`]).
    pub fn adapter_spec(
        &self,
        selector: medley_spec::AdapterSelector<'_>,
    ) -> Result<AdapterSpec, ValidationError> {
        if let Some(digest) = selector.adapter_id.and_then(affinity::parse_merge_label) {
            return self.labelled_merge(selector, digest);
        }
        let named = self.inner.merges.lookup(&selector);
        let selector = named.as_ref().map_or(selector, |m| m.expand(&selector));
        Ok(medley_spec::resolve_selector(
            selector,
            &self.inner.limits.adapters,
        )?)
    }

    /// The merge a `merge:<digest>` label stands for, checked against the digest.
    fn labelled_merge(
        &self,
        selector: medley_spec::AdapterSelector<'_>,
        digest: &str,
    ) -> Result<AdapterSpec, ValidationError> {
        let named = self.inner.merges.by_digest(digest);
        let selector = match (selector.merged_adapters, &named) {
            (Some(_), _) => medley_spec::AdapterSelector {
                adapter_id: None,
                ..selector
            },
            (None, Some(m)) => m.expand(&selector),
            (None, None) => return Err(ValidationError::UnknownMergeDigest(digest.to_string())),
        };
        let spec = medley_spec::resolve_selector(selector, &self.inner.limits.adapters)?;
        let actual = spec.key().to_string();
        if !matches!(spec, AdapterSpec::Merged(_)) || actual != digest {
            return Err(ValidationError::MergeDigestMismatch {
                named: digest.to_string(),
                actual,
            });
        }
        Ok(spec)
    }

    /// Tokenizes `inputs` (for `/tokenize`): each token with the text it covers.
    pub async fn tokenize(
        &self,
        inputs: String,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenSpan>, ValidationError> {
        let encoded = self
            .inner
            .pool
            .encode(inputs.clone(), add_special_tokens)
            .await?;
        Ok(encoded.spans(&inputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::testing::{test_limits, word_tokenizer};
    use crate::infer::{AdapterSpec, GenerateParameters};

    fn validation() -> Validation {
        Validation::new(word_tokenizer(), test_limits()).unwrap()
    }

    fn request(inputs: &str, parameters: GenerateParameters) -> GenerateRequest {
        GenerateRequest {
            inputs: inputs.into(),
            parameters,
        }
    }

    fn words(n: usize) -> String {
        vec!["hello"; n].join(" ")
    }

    #[tokio::test]
    async fn valid_request_is_tokenized_with_bos() {
        let v = validation();
        let r = v
            .validate(request(
                "hello world",
                GenerateParameters {
                    stop: Some(vec!["x".into()]),
                    seed: Some(7),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(r.input_ids.len(), 3);
        assert_eq!(r.input_ids[0], 1, "BOS first");
        assert_eq!(r.stopping_parameters.stop_sequences, vec!["x".to_string()]);
        assert_eq!(r.stopping_parameters.max_new_tokens, 16);
        assert_eq!(r.parameters.seed, 7);
        assert_eq!(r.adapter, AdapterSpec::Base);
        assert_eq!(r.inputs, "hello world");
    }

    #[tokio::test]
    async fn long_prompts_need_truncate() {
        let v = validation();
        // 40 words + BOS = 41 tokens > max_input_length 32.
        let err = v
            .validate(request(&words(40), GenerateParameters::default()))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::InputLength {
                max_input_length: 32,
                input_length: 41
            }
        );
        let r = v
            .validate(request(
                &format!("{} world", words(39)),
                GenerateParameters {
                    truncate: Some(5),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(r.input_ids.len(), 5);
        let world = word_tokenizer().token_to_id("world").unwrap();
        assert_eq!(r.input_ids.last(), Some(&world), "the last tokens are kept");
    }

    #[tokio::test]
    async fn input_plus_new_tokens_is_bounded() {
        let v = validation();
        let err = v
            .validate(request(
                &words(29),
                GenerateParameters {
                    max_new_tokens: Some(40),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::MaxTotalTokens {
                max_total_tokens: 64,
                input_length: 30,
                max_new_tokens: 40
            }
        );
    }

    #[tokio::test]
    async fn empty_inputs_are_rejected() {
        let v = validation();
        assert_eq!(
            v.validate(request("", GenerateParameters::default()))
                .await
                .unwrap_err(),
            ValidationError::EmptyInput
        );
    }

    #[tokio::test]
    async fn works_with_the_tiny_llama_fixture_tokenizer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama/tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).expect("fixture tokenizer");
        let bos = tokenizer.token_to_id("<s>").expect("BOS in the vocabulary");
        let v = Validation::new(tokenizer.clone(), test_limits()).unwrap();
        let prompt = "Hello world, héllo wörld ✓";
        let r = v
            .validate(request(prompt, GenerateParameters::default()))
            .await
            .unwrap();
        assert_eq!(r.input_ids[0], bos);
        assert_eq!(
            r.input_ids,
            tokenizer.encode(prompt, true).unwrap().get_ids()
        );
        let spans = v.tokenize(prompt.into(), false).await.unwrap();
        assert_eq!(
            spans.iter().map(|s| s.id).collect::<Vec<_>>(),
            tokenizer.encode(prompt, false).unwrap().get_ids()
        );
        for s in &spans {
            assert!(s.start <= s.stop && s.stop <= prompt.len(), "{s:?}");
            if let Some(text) = prompt.get(s.start..s.stop) {
                assert_eq!(s.text, text);
            }
        }
    }

    #[tokio::test]
    async fn tokenize_returns_spans() {
        let v = validation();
        let spans = v.tokenize("hello world".into(), true).await.unwrap();
        assert_eq!(spans.len(), 3);
        assert_eq!(
            (spans[0].start, spans[0].stop),
            (0, 0),
            "BOS covers nothing"
        );
        assert_eq!(spans[2].text, "world");
        assert_eq!((spans[2].start, spans[2].stop), (6, 11));
    }
}
