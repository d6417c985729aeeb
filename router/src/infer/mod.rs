//! The facade both fronts call: admission control, validation, scheduling and stream handling.
//!
//! [`Infer::generate_stream`] admits a request (a permit of `max_concurrent_requests`, else
//! [`InferError::Overloaded`]), validates it, hands it to the [`Backend`] and returns a
//! [`GenerateStream`] of its events; [`Infer::generate`] collects that stream into a
//! [`GenerateOutput`]. Metrics (`medley_request_*`) are recorded here, once for both fronts.

mod request;
mod stream;
#[cfg(test)]
pub(crate) mod testing;
mod types;

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use medley_spec::{
    AdapterKey, AdapterRef, AdapterSource, AdapterSpec, MergedAdapterSpec, UnknownAdapterSource,
    derived_merge_seed,
};
pub use request::*;
pub use stream::{GenerateStream, RequestMeta, Timings};
pub use types::*;

use crate::affinity::{self, LabelBudget};
use crate::backend::adapters::AdminError;
use crate::backend::{Backend, BackendInfo};
use crate::error::InferError;
use crate::metrics as names;
use crate::validation::Validation;

/// A finished generation, collected from its stream.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Final text (prompt prepended when `return_full_text` was asked), count, reason, seed.
    pub generated_text: GeneratedText,
    /// Prompt tokens with logprobs (empty unless `decoder_input_details`).
    pub prefill: Vec<PrefillToken>,
    /// Generated tokens, in order.
    pub tokens: Vec<Token>,
    /// Alternatives of each generated token (inner lists empty unless asked).
    pub top_tokens: Vec<Vec<Token>>,
    /// Prompt tokens whose KV came from the shards' prefix cache (`None`: not reported).
    pub cached_tokens: Option<u32>,
    /// Facts known since admission.
    pub meta: RequestMeta,
    /// Where the time went.
    pub timings: Timings,
}

/// Admission, validation and scheduling of generation requests. Cheap to clone.
#[derive(Clone)]
pub struct Infer {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    validation: Validation,
    permits: Arc<Semaphore>,
    /// Bounds the `adapter` label of [`names::ADAPTER_REQUEST_COUNT`].
    adapter_labels: LabelBudget,
}

impl Infer {
    /// Builds the facade; at most `validation.limits().max_concurrent_requests` requests are in
    /// flight at once.
    pub fn new(backend: Arc<dyn Backend>, validation: Validation) -> Self {
        let limit = validation.limits().max_concurrent_requests;
        let permits = Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS)));
        Self {
            inner: Arc::new(Inner {
                backend,
                validation,
                permits,
                adapter_labels: LabelBudget::new(names::MAX_ADAPTER_LABELS),
            }),
        }
    }

    /// The validation (limits and tokenizer) requests go through.
    pub fn validation(&self) -> &Validation {
        &self.inner.validation
    }

    /// The backend (adapter management goes to it directly).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The adapter or merge that management request fields name (the base model is refused).
    pub fn admin_spec(
        &self,
        selector: medley_spec::AdapterSelector<'_>,
    ) -> Result<AdapterSpec, AdminError> {
        let spec = self
            .inner
            .validation
            .adapter_spec(selector)
            .map_err(InferError::from)?;
        if spec.is_base() {
            return Err(AdminError::BaseModel);
        }
        Ok(spec)
    }

    /// Facts about the model behind the backend.
    pub fn backend_info(&self) -> BackendInfo {
        self.inner.backend.info()
    }

    /// True when the backend can serve requests.
    pub async fn health(&self) -> bool {
        self.inner.backend.health().await
    }

    /// Admits, validates and schedules a request. Errors before the first event (overloaded,
    /// validation, scheduling) are returned here; later ones arrive on the stream.
    pub async fn generate_stream(
        &self,
        request: GenerateRequest,
    ) -> Result<GenerateStream, InferError> {
        self.generate_stream_with(request, true).await
    }

    /// [`Infer::generate_stream`], choosing whether tokenization adds the special tokens (BOS...)
    /// to the prompt (see [`Validation::validate_with`]).
    pub async fn generate_stream_with(
        &self,
        request: GenerateRequest,
        add_special_tokens: bool,
    ) -> Result<GenerateStream, InferError> {
        metrics::counter!(names::REQUEST_COUNT).increment(1);
        let result = self.admit(request, add_special_tokens).await;
        if let Err(e) = &result {
            stream::record_failure(e);
        }
        result
    }

    async fn admit(
        &self,
        request: GenerateRequest,
        add_special_tokens: bool,
    ) -> Result<GenerateStream, InferError> {
        let received = Instant::now();
        let permit = Arc::clone(&self.inner.permits)
            .try_acquire_owned()
            .map_err(|_| InferError::Overloaded)?;
        let full_text_prefix = request
            .parameters
            .return_full_text
            .unwrap_or(false)
            .then(|| request.inputs.clone());
        let requested_id = request.parameters.adapter_id.clone();
        let valid = self
            .inner
            .validation
            .validate_with(request, add_special_tokens)
            .instrument(crate::telemetry::validation_span())
            .await?;
        let meta = RequestMeta {
            input_length: valid.input_length(),
            seed: valid.parameters.do_sample.then_some(valid.parameters.seed),
            validation_time: received.elapsed(),
            received,
            adapter: valid
                .adapter
                .source()
                .map(|source| (valid.adapter.ids(), source.name().to_string())),
            affinity: affinity::request_label(
                requested_id.as_deref(),
                &valid.adapter,
                self.inner.validation.merges(),
            ),
        };
        let label = self.inner.adapter_labels.label(meta.affinity.as_deref());
        metrics::counter!(names::ADAPTER_REQUEST_COUNT, names::ADAPTER_LABEL => label).increment(1);
        metrics::histogram!(names::REQUEST_VALIDATION_DURATION)
            .record(meta.validation_time.as_secs_f64());
        metrics::histogram!(names::REQUEST_INPUT_LENGTH).record(f64::from(meta.input_length));
        tracing::debug!(
            input_length = meta.input_length,
            max_new_tokens = valid.stopping_parameters.max_new_tokens,
            "request validated"
        );
        let receiver = self.inner.backend.schedule(valid)?;
        Ok(GenerateStream::new(
            receiver,
            permit,
            meta,
            full_text_prefix,
        ))
    }

    /// Generates a whole response.
    pub async fn generate(&self, request: GenerateRequest) -> Result<GenerateOutput, InferError> {
        self.generate_with(request, true).await
    }

    /// [`Infer::generate`], choosing whether tokenization adds the special tokens (BOS...) to
    /// the prompt (see [`Validation::validate_with`]).
    pub async fn generate_with(
        &self,
        request: GenerateRequest,
        add_special_tokens: bool,
    ) -> Result<GenerateOutput, InferError> {
        let mut stream = self
            .generate_stream_with(request, add_special_tokens)
            .await?;
        let mut prefill = Vec::new();
        let mut tokens = Vec::new();
        let mut top_tokens = Vec::new();
        while let Some(event) = stream.next().await {
            match event? {
                InferStreamResponse::Prefill(p) => prefill = p,
                InferStreamResponse::Intermediate {
                    token,
                    top_tokens: top,
                } => {
                    tokens.push(token);
                    top_tokens.push(top);
                }
                InferStreamResponse::End {
                    token,
                    top_tokens: top,
                    generated_text,
                    cached_tokens,
                    ..
                } => {
                    tokens.push(token);
                    top_tokens.push(top);
                    return Ok(GenerateOutput {
                        generated_text,
                        prefill,
                        tokens,
                        top_tokens,
                        cached_tokens,
                        meta: stream.meta().clone(),
                        timings: stream.timings().copied().unwrap_or_default(),
                    });
                }
            }
        }
        // A GenerateStream always ends with End or an error; this is defensive.
        Err(InferError::IncompleteGeneration)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Behavior, FakeBackend, test_infer};
    use super::*;
    use crate::error::ValidationError;
    use std::time::Duration;

    fn request(inputs: &str, max_new_tokens: i64) -> GenerateRequest {
        GenerateRequest {
            inputs: inputs.into(),
            parameters: GenerateParameters {
                max_new_tokens: Some(max_new_tokens),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn generate_collects_tokens_and_timings() {
        let backend = FakeBackend::new();
        let infer = test_infer(backend.clone());
        let out = infer.generate(request("hello world", 4)).await.unwrap();
        assert_eq!(out.tokens.len(), 4);
        assert_eq!(out.generated_text.generated_tokens, 4);
        assert_eq!(out.generated_text.finish_reason, FinishReason::Length);
        assert_eq!(
            out.generated_text.text,
            FakeBackend::expected_text(&backend.requests()[0].input_ids, 4)
        );
        assert_eq!(out.meta.input_length, 3);
        assert!(out.timings.total >= out.timings.inference);
    }

    #[tokio::test]
    async fn return_full_text_prepends_the_prompt() {
        let infer = test_infer(FakeBackend::new());
        let mut r = request("hello world", 2);
        r.parameters.return_full_text = Some(true);
        let out = infer.generate(r).await.unwrap();
        assert!(
            out.generated_text.text.starts_with("hello world "),
            "{}",
            out.generated_text.text
        );
    }

    #[tokio::test]
    async fn the_seed_is_reported_for_sampled_requests_only() {
        for behavior in [Behavior::Normal, Behavior::OmitSeed] {
            let infer = test_infer(FakeBackend::new().with_behavior(behavior));
            let mut sampled = request("hello", 2);
            sampled.parameters.do_sample = Some(true);
            let out = infer.generate(sampled).await.unwrap();
            let seed = out.meta.seed.expect("a random seed was chosen");
            assert_eq!(out.generated_text.seed, Some(seed), "{behavior:?}");
            let greedy = infer.generate(request("hello", 2)).await.unwrap();
            assert_eq!(greedy.generated_text.seed, None, "{behavior:?}");
        }
    }

    #[tokio::test]
    async fn missing_end_is_incomplete_and_errors_pass_through() {
        let infer = test_infer(FakeBackend::new().with_behavior(Behavior::CloseWithoutEnd));
        assert!(matches!(
            infer.generate(request("hello", 3)).await.unwrap_err(),
            InferError::IncompleteGeneration
        ));
        let infer = test_infer(FakeBackend::new().with_behavior(Behavior::FailAfter(1)));
        assert!(matches!(
            infer.generate(request("hello", 3)).await.unwrap_err(),
            InferError::Generation(_)
        ));
        let infer = test_infer(FakeBackend::new().with_behavior(Behavior::RejectSchedule));
        assert!(matches!(
            infer.generate(request("hello", 3)).await.unwrap_err(),
            InferError::Unavailable(_)
        ));
    }

    #[tokio::test]
    async fn validation_errors_reach_the_caller() {
        let backend = FakeBackend::new();
        let infer = test_infer(backend.clone());
        let err = infer.generate(request("", 3)).await.unwrap_err();
        assert!(matches!(
            err,
            InferError::Validation(ValidationError::EmptyInput)
        ));
        assert!(backend.requests().is_empty(), "nothing scheduled");
    }

    #[tokio::test]
    async fn permits_limit_concurrency_until_the_stream_ends() {
        let backend = FakeBackend::new().with_delay(Duration::from_millis(20));
        let infer = test_infer(backend.clone()); // max_concurrent_requests = 2
        let a = infer.generate_stream(request("hello", 50)).await.unwrap();
        let b = infer.generate_stream(request("hello", 50)).await.unwrap();
        assert!(matches!(
            infer.generate_stream(request("hello", 1)).await.err(),
            Some(InferError::Overloaded)
        ));
        drop(a);
        // The dropped stream released its permit and cancelled the backend request.
        let c = infer.generate(request("hello", 1)).await.unwrap();
        assert_eq!(c.tokens.len(), 1);
        backend.wait_cancelled(1).await;
        drop(b);
        backend.wait_cancelled(2).await;
    }
}
