//! Whole (non-streamed) answers: every choice generated concurrently, then one JSON body.

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;

use super::super::headers;
use super::error::OpenAiError;
use super::plan::Plan;
use super::response::{Logprobs, Responder, Usage, finish_reason, visible_len};
use crate::http::AppState;
use crate::infer::GenerateOutput;

/// Runs every choice of `plan` and answers with one JSON body.
pub async fn respond(state: &AppState, plan: Plan) -> Result<Response, OpenAiError> {
    let runs = plan
        .requests
        .iter()
        .cloned()
        .map(|r| state.infer.generate_with(r, plan.add_special_tokens));
    let outputs = try_join_all(runs).await.map_err(|e| plan.target.error(e))?;
    let responder = Responder::new(plan.endpoint, plan.model.clone());
    let mut usage = Usage::default();
    let mut choices = Vec::with_capacity(outputs.len());
    for (index, out) in outputs.iter().enumerate() {
        let counts = plan.counts_prompt.get(index).copied().unwrap_or(false);
        usage.add(
            counts.then_some(out.meta.input_length),
            out.generated_text.generated_tokens,
            out.cached_tokens,
        );
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        choices.push(choice(&responder, &plan, index, out));
    }
    tracing::debug!(
        choices = choices.len(),
        completion_tokens = usage.completion_tokens,
        "OpenAI request finished"
    );
    let h = outputs
        .first()
        .map(|o| headers::admitted(state, &o.meta))
        .unwrap_or_default();
    let body = responder.envelope(choices, Some(usage), false);
    Ok((h, Json(body)).into_response())
}

/// One finished choice: its text up to the first stop sequence, its logprobs when asked.
fn choice(
    responder: &Responder,
    plan: &Plan,
    index: u32,
    out: &GenerateOutput,
) -> super::response::Choice {
    let text = &out.generated_text.text;
    let visible = text
        .get(..visible_len(text, &plan.stop, true))
        .unwrap_or(text)
        .to_string();
    let logprobs = plan.logprobs.map(|k| {
        let tokens: Vec<_> = out
            .tokens
            .iter()
            .cloned()
            .zip(out.top_tokens.iter().cloned())
            .collect();
        Logprobs::new(responder.endpoint(), &tokens, k > 0, 0)
    });
    responder.choice(
        index,
        visible,
        logprobs,
        Some(finish_reason(out.generated_text.finish_reason)),
        None,
    )
}
