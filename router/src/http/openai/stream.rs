//! Streamed answers: server-sent events in OpenAI's chunk format.
//!
//! Every choice is admitted and its first event awaited before the 200 is committed, so a
//! request that fails early (unknown model, overload, shard down) gets a proper HTTP error.
//! Then the choices' events are merged as they come: chat streams open each choice with a
//! `{"role": "assistant", "content": ""}` delta; each token adds a chunk with its new text (text
//! that could still become a stop sequence is held back, and the stop sequence itself is never
//! sent) and, when asked, its logprobs; a choice's last chunk has its `finish_reason`. With
//! `stream_options.include_usage`, a last chunk carries `usage` and no choices. The stream ends
//! with `data: [DONE]`, or right after an OpenAI-shaped `{"error": ...}` event if a generation
//! fails midway. Dropping the response (client gone) drops every choice's stream, which cancels
//! them in the backend.

use std::convert::Infallible;

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, select_all};
use futures::{StreamExt, future};
use serde::Serialize;

use super::super::headers;
use super::error::OpenAiError;
use super::plan::{Endpoint, Plan};
use super::response::{Logprobs, Responder, Usage, finish_reason, visible_len};
use crate::error::InferError;
use crate::http::AppState;
use crate::infer::{InferStreamResponse, Token};

/// One choice's event, tagged with its index.
type Tagged = (usize, Result<InferStreamResponse, InferError>);

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default().json_data(value).unwrap_or_else(|e| {
        tracing::error!("failed to encode an SSE event: {e}");
        Event::default().data(r#"{"error":{"message":"failed to encode event","type":"server_error","param":null,"code":null}}"#)
    })
}

/// What has been sent of one choice.
#[derive(Debug, Default)]
struct ChoiceState {
    /// Text of the tokens so far (special tokens left out).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Prompt tokens, when this choice's prompt counts in `usage`.
    prompt_tokens: Option<u32>,
}

/// Turns the merged events into chunks.
struct Emitter {
    responder: Responder,
    stop: Vec<String>,
    logprobs: Option<u32>,
    include_usage: bool,
    choices: Vec<ChoiceState>,
    usage: Usage,
}

impl Emitter {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<Logprobs>,
        finish: Option<&'static str>,
    ) -> Event {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let choice = self
            .responder
            .choice(index, text, logprobs, finish, Some(false));
        json_event(&self.responder.envelope(vec![choice], None, true))
    }

    /// The chunks that open the stream (chat: the role of each choice).
    fn opening(&self) -> Vec<Event> {
        if self.responder.endpoint() != Endpoint::Chat {
            return Vec::new();
        }
        (0..self.choices.len())
            .map(|i| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let choice = self
                    .responder
                    .choice(index, String::new(), None, None, Some(true));
                json_event(&self.responder.envelope(vec![choice], None, true))
            })
            .collect()
    }

    /// The chunk of one token (`None` when there is nothing to send yet). The last token of a
    /// choice comes with `finish` and the generation's final text, which replaces the text of
    /// the tokens: the decoder may have held back the end of a multi-byte character that only
    /// the final decode completes, and the stream must end with the same text as the JSON answer.
    fn token(
        &mut self,
        index: usize,
        token: Token,
        top: Vec<Token>,
        finish: Option<(&'static str, String)>,
    ) -> Option<Event> {
        let endpoint = self.responder.endpoint();
        let state = self.choices.get_mut(index)?;
        let offset = state.text.len();
        if !token.special {
            state.text.push_str(&token.text);
        }
        let finish = finish.map(|(reason, text)| {
            state.text = text;
            reason
        });
        let end = visible_len(&state.text, &self.stop, finish.is_some());
        let delta = state
            .text
            .get(state.sent..end)
            .unwrap_or_default()
            .to_string();
        state.sent = state.sent.max(end);
        let logprobs = self
            .logprobs
            .filter(|_| !token.special)
            .map(|k| Logprobs::new(endpoint, &[(token, top)], k > 0, offset));
        if delta.is_empty() && logprobs.is_none() && finish.is_none() {
            return None;
        }
        Some(self.chunk(index, delta, logprobs, finish))
    }

    /// The events of one choice's event; `true` when the stream must end (an error).
    fn on_event(&mut self, (index, item): Tagged) -> (Vec<Event>, bool) {
        match item {
            Ok(InferStreamResponse::Prefill(_)) => (Vec::new(), false),
            Ok(InferStreamResponse::Intermediate { token, top_tokens }) => (
                self.token(index, token, top_tokens, None)
                    .into_iter()
                    .collect(),
                false,
            ),
            Ok(InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                cached_tokens,
                ..
            }) => {
                let prompt = self.choices.get(index).and_then(|c| c.prompt_tokens);
                self.usage
                    .add(prompt, generated_text.generated_tokens, cached_tokens);
                let finish = Some((
                    finish_reason(generated_text.finish_reason),
                    generated_text.text,
                ));
                (
                    self.token(index, token, top_tokens, finish)
                        .into_iter()
                        .collect(),
                    false,
                )
            }
            Err(e) => {
                tracing::warn!(choice = index, "streamed generation failed: {e}");
                (vec![json_event(&OpenAiError::from(e).body())], true)
            }
        }
    }

    /// The events after every choice finished: `usage` when asked, then `[DONE]`.
    fn closing(&self) -> Vec<Event> {
        let usage = self
            .include_usage
            .then(|| json_event(&self.responder.envelope(Vec::new(), Some(self.usage), true)));
        usage
            .into_iter()
            .chain([Event::default().data("[DONE]")])
            .collect()
    }
}

/// Admits every choice of `plan` and answers with their merged event stream.
pub async fn respond(state: &AppState, plan: Plan) -> Result<Response, OpenAiError> {
    let mut streams = Vec::with_capacity(plan.requests.len());
    for request in plan.requests.iter().cloned() {
        let s = state
            .infer
            .generate_stream_with(request, plan.add_special_tokens)
            .await
            .map_err(|e| plan.target.error(e))?;
        streams.push(s);
    }
    let firsts = future::join_all(streams.iter_mut().map(|s| s.next())).await;
    if let Some(Some(Err(e))) = firsts.iter().find(|f| matches!(f, Some(Err(_)))) {
        return Err(plan.target.error(e.clone()));
    }
    let mut h = streams
        .first()
        .map(|s| headers::admitted(state, s.meta()))
        .unwrap_or_default();
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    let choices = streams
        .iter()
        .zip(&plan.counts_prompt)
        .map(|(s, &counts)| ChoiceState {
            prompt_tokens: counts.then_some(s.meta().input_length),
            ..Default::default()
        })
        .collect();
    let merged: BoxStream<'static, Tagged> = select_all(
        streams
            .into_iter()
            .zip(firsts)
            .enumerate()
            .map(|(i, (s, first))| stream::iter(first).chain(s).map(move |e| (i, e)).boxed()),
    )
    .boxed();
    let emitter = Emitter {
        responder: Responder::new(plan.endpoint, plan.model.clone()),
        stop: plan.stop.clone(),
        logprobs: plan.logprobs,
        include_usage: plan.include_usage,
        choices,
        usage: Usage::default(),
    };
    let opening = emitter.opening();
    let events = stream::unfold(Some((emitter, merged)), |st| async move {
        let (mut emitter, mut merged) = st?;
        match merged.next().await {
            Some(tagged) => {
                let (events, end) = emitter.on_event(tagged);
                Some((events, (!end).then_some((emitter, merged))))
            }
            None => Some((emitter.closing(), None)),
        }
    })
    .flat_map(stream::iter);
    let body = stream::iter(opening).chain(events).map(Ok::<_, Infallible>);
    Ok((h, Sse::new(body).keep_alive(KeepAlive::default())).into_response())
}
