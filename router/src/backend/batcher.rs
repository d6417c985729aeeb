//! The continuous-batching loop: prefill waiting requests, decode the running batch, let new
//! requests join between decode steps, send each request its tokens, and drop finished or
//! cancelled requests from the shards' batches.

use std::collections::HashMap;
use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tracing::Instrument;

use super::client::ClientError;
use super::guarded::Guarded;
use super::queue::{BatchBudget, Entry};
use super::scheduler::Scheduler;
use super::shard_api::ShardApi;
use crate::config::BatchingConfig;
use crate::error::InferError;
use crate::infer::{FinishReason, GeneratedText, InferStreamResponse, PrefillToken, Token};

/// Budgets of the loop, resolved after warmup.
#[derive(Debug, Clone)]
pub(crate) struct LoopConfig {
    /// From the router flags.
    pub batching: BatchingConfig,
    /// Tokens all running requests may hold together.
    pub max_batch_total_tokens: u32,
}

/// Metric names of the batching loop.
mod names {
    pub const BATCH_SIZE: &str = "medley_batch_current_size";
    pub const BATCH_MAX_TOKENS: &str = "medley_batch_current_max_tokens";
    pub const CANCELLED: &str = "medley_request_cancelled";
    pub const FORWARD: &str = "medley_batch_forward_duration";
    pub const COMM: &str = "medley_batch_comm_duration";
    pub const STEP: &str = "medley_batch_inference_duration";
}

type Entries = HashMap<u64, Entry>;

/// Runs until the client's tripwire fires (once the batch in hand has failed) or the task is
/// aborted.
pub(crate) async fn batching_task<S: ShardApi>(
    client: Guarded<S>,
    queue: Scheduler,
    cfg: LoopConfig,
) {
    let b = &cfg.batching;
    loop {
        tokio::select! {
            _ = client.until_tripped() => return,
            _ = queue.wait_for_work() => {}
        }
        while let Some(next) = queue.next_batch(BatchBudget {
            min_size: None,
            max_size: b.max_batch_size,
            prefill_tokens: b.max_batch_prefill_tokens,
            total_tokens: cfg.max_batch_total_tokens,
        }) {
            let mut entries = next.entries;
            // Running from the moment the batch is taken (its prefill may take a while).
            record_batch(
                entries.len(),
                next.batch.max_tokens,
                cfg.max_batch_total_tokens,
            );
            let mut cached = prefill(&client, next.batch, &mut entries).await;
            let mut waiting_steps = 1usize;
            while let Some(batch) = cached {
                let mut batches = vec![batch];
                let (size, max_tokens) = (batches[0].size as usize, batches[0].max_tokens);
                record_batch(size, max_tokens, cfg.max_batch_total_tokens);
                let min_size = (waiting_steps < b.max_waiting_tokens)
                    .then(|| (size as f32 * b.waiting_served_ratio).floor() as usize);
                // A full batch takes no one (`Some(0)`); `None` means no size limit.
                let room = b.max_batch_size.map(|m| m.saturating_sub(size));
                let next = (room != Some(0))
                    .then(|| {
                        queue.next_batch(BatchBudget {
                            min_size: min_size.filter(|m| *m > 0),
                            max_size: room,
                            prefill_tokens: b.max_batch_prefill_tokens,
                            total_tokens: cfg.max_batch_total_tokens.saturating_sub(max_tokens),
                        })
                    })
                    .flatten();
                if let Some(next) = next {
                    let mut new_entries = next.entries;
                    if let Some(new_batch) = prefill(&client, next.batch, &mut new_entries).await {
                        batches.push(new_batch);
                    }
                    entries.extend(new_entries);
                    waiting_steps = 1;
                } else {
                    waiting_steps += 1;
                }
                // Drop requests whose client went away before spending a step on them.
                let mut live = vec![];
                for batch in batches {
                    if let Some(b) = filter_batch(&client, batch, &mut entries).await {
                        live.push(b);
                    }
                }
                cached = if live.is_empty() {
                    None
                } else {
                    decode(&client, live, &mut entries).await
                };
            }
            record_batch(0, 0, cfg.max_batch_total_tokens);
        }
    }
}

/// The running batch's gauges: its size (= running requests), the tokens it reserves, and their
/// share of the KV budget.
fn record_batch(size: usize, max_tokens: u32, budget: u32) {
    metrics::gauge!(names::BATCH_SIZE).set(size as f64);
    metrics::gauge!(crate::metrics::REQUESTS_RUNNING).set(size as f64);
    metrics::gauge!(names::BATCH_MAX_TOKENS).set(f64::from(max_tokens));
    let used = f64::from(max_tokens) / f64::from(budget.max(1));
    metrics::gauge!(crate::metrics::KV_CACHE_UTILIZATION).set(used.min(1.0));
}

async fn prefill(
    client: &Guarded<impl ShardApi>,
    mut batch: pb::Batch,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    let id = batch.id;
    let start = Instant::now();
    // Each request's prefill span travels with it to the shards; the call itself runs in the
    // first request's (its `traceparent` metadata).
    let size = batch.requests.len();
    for r in &mut batch.requests {
        if let Some(entry) = entries.get_mut(&r.id) {
            r.traceparent = entry.trace.start_prefill(id, size);
        }
    }
    let call_span = (batch.requests.first())
        .and_then(|r| entries.get(&r.id))
        .map_or_else(tracing::Span::none, |e| e.trace.prefill_span().clone());
    match client.prefill(batch).instrument(call_span).await {
        Ok(resp) => {
            record_timings(resp.timings.as_ref(), "prefill", start);
            send_generations(resp.generations, entries);
            // Those still running decode from now on.
            for entry in entries.values_mut() {
                entry.trace.start_decode();
            }
            filter_next(client, resp.batch, entries).await
        }
        Err(e) => {
            fail_all(client, Some(id), entries, e).await;
            None
        }
    }
}

async fn decode(
    client: &Guarded<impl ShardApi>,
    batches: Vec<pb::CachedBatch>,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    let start = Instant::now();
    let ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
    match client.decode(batches).await {
        Ok(resp) => {
            record_timings(resp.timings.as_ref(), "decode", start);
            send_generations(resp.generations, entries);
            filter_next(client, resp.batch, entries).await
        }
        Err(e) => {
            for id in ids {
                let _ = client.clear_cache(Some(id)).await;
            }
            fail_all(client, None, entries, e).await;
            None
        }
    }
}

fn record_timings(t: Option<&pb::Timings>, method: &'static str, start: Instant) {
    if let Some(t) = t {
        metrics::histogram!(names::FORWARD, "method" => method).record(t.forward_ns as f64 / 1e9);
        metrics::histogram!(names::COMM, "method" => method).record(t.comm_ns as f64 / 1e9);
    }
    metrics::histogram!(names::STEP, "method" => method).record(start.elapsed().as_secs_f64());
}

/// Filters the shard's next batch to the entries still alive.
async fn filter_next(
    client: &Guarded<impl ShardApi>,
    next: Option<pb::CachedBatch>,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    match next {
        Some(batch) => filter_batch(client, batch, entries).await,
        None => None,
    }
}

/// Removes from `batch` the requests that finished or whose client left.
async fn filter_batch(
    client: &Guarded<impl ShardApi>,
    batch: pb::CachedBatch,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    let before = entries.len();
    entries.retain(|_, e| !e.response_tx.is_closed());
    let cancelled = before - entries.len();
    if cancelled > 0 {
        metrics::counter!(names::CANCELLED).increment(cancelled as u64);
        tracing::debug!(cancelled, "dropping cancelled requests");
    }
    let keep: Vec<u64> = batch
        .request_ids
        .iter()
        .copied()
        .filter(|id| entries.contains_key(id))
        .collect();
    if keep.len() == batch.request_ids.len() {
        return Some(batch);
    }
    if keep.is_empty() {
        if let Err(e) = client.clear_cache(Some(batch.id)).await {
            tracing::error!("clear_cache({}) failed: {e}", batch.id);
        }
        return None;
    }
    match client.filter_batch(batch.id, keep).await {
        Ok(b) => b,
        Err(e) => {
            fail_all(client, Some(batch.id), entries, e).await;
            None
        }
    }
}

/// Fails every entry with the shard's error and clears the batch.
async fn fail_all(
    client: &Guarded<impl ShardApi>,
    batch_id: Option<u64>,
    entries: &mut Entries,
    e: ClientError,
) {
    tracing::error!("shard call failed: {e}");
    if let Some(id) = batch_id {
        let _ = client.clear_cache(Some(id)).await;
    }
    // A shard that died or was replaced mid-call may look like a failed request (a broken
    // stream, an unknown batch or slot): ask.
    let err = if client.lost(&e).await {
        InferError::Unavailable(format!(
            "the shards failed during the request ({e}); retry once they are back"
        ))
    } else {
        InferError::Generation(e.to_string())
    };
    for (_, entry) in entries.drain() {
        entry.trace.failed(&err);
        let _ = entry.response_tx.send(Err(err.clone()));
    }
}

/// Sends each generation to its request; removes entries that finished or whose client left.
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries) {
    for g in generations {
        let id = g.request_id;
        let Some(entry) = entries.get(&id) else {
            continue;
        };
        match send_generation(g, entry) {
            Ok(false) => {}
            Ok(true) => {
                entries.remove(&id);
            }
            Err(()) => {
                // The client left: drop the request from the batch.
                metrics::counter!(names::CANCELLED).increment(1);
                tracing::debug!(request = id, "client gone, dropping request");
                entries.remove(&id);
            }
        }
    }
}

type SendResult = Result<bool, ()>;

/// Sends the events of one generation; Ok(true) when the request finished.
fn send_generation(g: pb::Generation, entry: &Entry) -> SendResult {
    let tx = &entry.response_tx;
    if let Some(prefill) = g.prefill_tokens {
        let tokens = prefill
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| PrefillToken {
                id: *id,
                text: prefill.texts.get(i).cloned().unwrap_or_default(),
                logprob: prefill.logprobs.get(i).copied().filter(|l| !l.is_nan()),
            })
            .collect();
        tx.send(Ok(InferStreamResponse::Prefill(tokens)))
            .map_err(|_| ())?;
    }
    if let Some(gt) = &g.generated_text {
        let reason = finish_reason(gt.finish_reason);
        entry.trace.finished(gt.generated_tokens, reason.as_str());
    }
    let Some(tokens) = g.tokens else {
        return Ok(false);
    };
    let n = tokens.ids.len();
    let mut top = g.top_tokens.into_iter();
    for i in 0..n {
        let token = Token {
            id: tokens.ids[i],
            text: tokens.texts.get(i).cloned().unwrap_or_default(),
            logprob: tokens.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: tokens.is_special.get(i).copied().unwrap_or(false),
        };
        let top_tokens = top.next().map(to_tokens).unwrap_or_default();
        let last = i + 1 == n;
        let event = match (&g.generated_text, last) {
            (Some(gt), true) => InferStreamResponse::End {
                token,
                top_tokens,
                generated_text: GeneratedText {
                    text: gt.text.clone(),
                    generated_tokens: gt.generated_tokens,
                    finish_reason: finish_reason(gt.finish_reason),
                    seed: gt.seed,
                },
                queued: entry.queued,
                start: entry.batch_time.unwrap_or(entry.queued),
            },
            _ => InferStreamResponse::Intermediate { token, top_tokens },
        };
        tx.send(Ok(event)).map_err(|_| ())?;
    }
    Ok(g.generated_text.is_some())
}

fn to_tokens(t: pb::Tokens) -> Vec<Token> {
    t.ids
        .iter()
        .enumerate()
        .map(|(i, id)| Token {
            id: *id,
            text: t.texts.get(i).cloned().unwrap_or_default(),
            logprob: t.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: t.is_special.get(i).copied().unwrap_or(false),
        })
        .collect()
}

fn finish_reason(code: i32) -> FinishReason {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::EosToken) => FinishReason::EosToken,
        Ok(pb::FinishReason::StopSequence) => FinishReason::StopSequence,
        _ => FinishReason::Length,
    }
}
