//! Server-sent events of a streamed generation: one `data:<StreamResponse>` event per token,
//! `generated_text`/`details` on the last one, `data:{"error", "error_type"}` if the generation
//! fails midway. Errors before the first event (validation, overload, adapter load failures) are
//! plain HTTP errors.
//!
//! The event stream owns the request's [`crate::infer::GenerateStream`]: when the client goes away,
//! hyper drops the body, which drops the backend receiver and cancels the request.

use std::convert::Infallible;

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, future};
use serde::Serialize;

use super::error::{ApiError, ErrorBody};
use super::types::{StreamDetails, StreamResponse, TokenJson};
use super::{AppState, headers};
use crate::error::InferError;
use crate::infer::{GenerateRequest, InferStreamResponse, ResponseOptions};

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default().json_data(value).unwrap_or_else(|e| {
        tracing::error!("failed to encode an SSE event: {e}");
        Event::default().data(r#"{"error":"failed to encode event","error_type":"generation"}"#)
    })
}

/// The SSE event of one stream item (`None` for events clients do not see, like prefill).
fn to_event(
    item: Result<InferStreamResponse, InferError>,
    opts: ResponseOptions,
    prompt_tokens: u32,
) -> Option<Event> {
    match item {
        Ok(InferStreamResponse::Prefill(_)) => None,
        Ok(InferStreamResponse::Intermediate { token, top_tokens }) => {
            Some(json_event(&StreamResponse {
                token: TokenJson::new(token, top_tokens, opts.alternatives),
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
        }) => Some(json_event(&StreamResponse {
            token: TokenJson::new(token, top_tokens, opts.alternatives),
            details: opts
                .details
                .then(|| StreamDetails::new(&generated_text, prompt_tokens, cached_tokens)),
            generated_text: Some(generated_text.text),
        })),
        Err(e) => Some(json_event(&ErrorBody::from(&e))),
    }
}

/// Admits the request and answers with its event stream.
pub(super) async fn stream(
    state: AppState,
    request: GenerateRequest,
) -> Result<Response, ApiError> {
    let opts = request.parameters.response_options();
    let mut generation = state.infer.generate_stream(request).await?;
    // Wait for the first event before committing a 200: a request that fails before its first
    // token (unknown adapter, failed merge, shard down) gets a proper HTTP error status.
    let first = generation.next().await;
    if let Some(Err(e)) = first {
        return Err(e.into());
    }
    let mut h = headers::admitted(&state, generation.meta());
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    let prompt_tokens = generation.meta().input_length;
    let events = futures::stream::iter(first)
        .chain(generation)
        .filter_map(move |item| future::ready(to_event(item, opts, prompt_tokens)))
        .map(Ok::<_, Infallible>);
    Ok((h, Sse::new(events).keep_alive(KeepAlive::default())).into_response())
}
