//! [`GenerateStream`]: one admitted request's events, with its concurrency permit, its metrics and
//! the guarantee that a stream ends with `End` or exactly one error.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::UnboundedReceiver;

use super::InferStreamResponse;
use crate::error::InferError;
use crate::metrics as names;

/// What is known about an admitted request before its first token.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMeta {
    /// Prompt tokens after truncation.
    pub input_length: u32,
    /// The sampling seed (random when the client gave none); `None` for greedy requests.
    /// Reported in the final details when the backend does not report one itself.
    pub seed: Option<u64>,
    /// Time spent in validation and tokenization.
    pub validation_time: Duration,
    /// When the request arrived.
    pub received: Instant,
    /// Adapter ids joined with `,` and their source, when not the base model (LoRAX's
    /// `x-adapter-id` / `x-adapter-source`).
    pub adapter: Option<(String, String)>,
    /// The name the request's adapter or merge goes by for gateway affinity
    /// ([`crate::affinity::request_label`]; `x-affinity-model`), when not the base model.
    pub affinity: Option<String>,
}

/// Where the time of a finished request went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Validation and tokenization.
    pub validation: Duration,
    /// From entering the backend's queue to the first forward pass.
    pub queue: Duration,
    /// From the first forward pass to the last token.
    pub inference: Duration,
    /// From arrival to the last token.
    pub total: Duration,
    /// `inference / generated_tokens`.
    pub time_per_token: Duration,
}

impl Timings {
    fn new(meta: &RequestMeta, queued: Instant, start: Instant, generated_tokens: u32) -> Self {
        let now = Instant::now();
        let inference = now.saturating_duration_since(start);
        Self {
            validation: meta.validation_time,
            queue: start.saturating_duration_since(queued),
            inference,
            total: now.saturating_duration_since(meta.received),
            time_per_token: inference / generated_tokens.max(1),
        }
    }
}

/// Counts a failed request under its `error_type`.
pub(crate) fn record_failure(e: &InferError) {
    metrics::counter!(names::REQUEST_FAILURE, names::FAILURE_LABEL => e.error_type()).increment(1);
}

fn record_success(t: &Timings, generated_tokens: u32) {
    metrics::counter!(names::REQUEST_SUCCESS).increment(1);
    metrics::histogram!(names::REQUEST_DURATION).record(t.total.as_secs_f64());
    metrics::histogram!(names::REQUEST_QUEUE_DURATION).record(t.queue.as_secs_f64());
    metrics::histogram!(names::REQUEST_INFERENCE_DURATION).record(t.inference.as_secs_f64());
    metrics::histogram!(names::REQUEST_GENERATED_TOKENS).record(f64::from(generated_tokens));
}

/// Time per output token after the first (nothing for a single token).
fn record_time_per_output_token(first: Instant, generated_tokens: u32) {
    if generated_tokens > 1 {
        let per_token = first.elapsed().as_secs_f64() / f64::from(generated_tokens - 1);
        metrics::histogram!(names::TIME_PER_OUTPUT_TOKEN).record(per_token);
    }
}

/// The events of one request: zero or one `Prefill`, `Intermediate` tokens, then either `End` or
/// one error (`IncompleteGeneration` when the backend closed the channel without `End`).
///
/// Holds the request's concurrency permit and the backend's receiver until the stream ends;
/// dropping the stream early drops the receiver, which cancels the request in the backend.
pub struct GenerateStream {
    active: Option<Active>,
    meta: RequestMeta,
    full_text_prefix: Option<String>,
    timings: Option<Timings>,
    /// When the first token arrived.
    first_token: Option<Instant>,
}

/// Fields drop in declaration order: the permit is free again by the time the backend sees its
/// receiver dropped.
struct Active {
    _permit: OwnedSemaphorePermit,
    receiver: UnboundedReceiver<Result<InferStreamResponse, InferError>>,
}

impl GenerateStream {
    pub(crate) fn new(
        receiver: UnboundedReceiver<Result<InferStreamResponse, InferError>>,
        permit: OwnedSemaphorePermit,
        meta: RequestMeta,
        full_text_prefix: Option<String>,
    ) -> Self {
        Self {
            active: Some(Active {
                _permit: permit,
                receiver,
            }),
            meta,
            full_text_prefix,
            timings: None,
            first_token: None,
        }
    }

    /// Facts known since admission.
    pub fn meta(&self) -> &RequestMeta {
        &self.meta
    }

    /// Timings, once `End` has been yielded.
    pub fn timings(&self) -> Option<&Timings> {
        self.timings.as_ref()
    }

    /// Records the time to the first token when `event` carries it, and returns when the first
    /// token came.
    fn first_token(&mut self) -> Instant {
        *self.first_token.get_or_insert_with(|| {
            let now = Instant::now();
            metrics::histogram!(names::TIME_TO_FIRST_TOKEN).record(
                now.saturating_duration_since(self.meta.received)
                    .as_secs_f64(),
            );
            now
        })
    }

    fn finish_with_error(&mut self, e: InferError) -> Poll<Option<<Self as Stream>::Item>> {
        self.active = None;
        record_failure(&e);
        tracing::debug!(error = %e, "generation failed");
        Poll::Ready(Some(Err(e)))
    }
}

impl Stream for GenerateStream {
    type Item = Result<InferStreamResponse, InferError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(active) = this.active.as_mut() else {
            return Poll::Ready(None);
        };
        match active.receiver.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(InferStreamResponse::End {
                token,
                top_tokens,
                mut generated_text,
                queued,
                start,
                cached_tokens,
            }))) => {
                this.active = None;
                let first = this.first_token();
                record_time_per_output_token(first, generated_text.generated_tokens);
                if generated_text.seed.is_none() {
                    generated_text.seed = this.meta.seed;
                }
                if let Some(prefix) = &this.full_text_prefix {
                    generated_text.text.insert_str(0, prefix);
                }
                let timings =
                    Timings::new(&this.meta, queued, start, generated_text.generated_tokens);
                record_success(&timings, generated_text.generated_tokens);
                this.timings = Some(timings);
                Poll::Ready(Some(Ok(InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                    cached_tokens,
                })))
            }
            Poll::Ready(Some(Ok(event))) => {
                if matches!(event, InferStreamResponse::Intermediate { .. }) {
                    this.first_token();
                }
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Err(e))) => this.finish_with_error(e),
            Poll::Ready(None) => this.finish_with_error(InferError::IncompleteGeneration),
        }
    }
}

impl Drop for GenerateStream {
    fn drop(&mut self) {
        if self.active.is_some() {
            tracing::debug!("request dropped before its end; cancelling it in the backend");
        }
    }
}
