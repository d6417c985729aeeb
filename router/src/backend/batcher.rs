//! The continuous-batching loop: one shard step at a time over the running batch. Waiting
//! requests join it through a prefill step that also decodes the running requests (their
//! streams do not stall for a separate prefill call); when none joins, a decode step runs. Each
//! step sends every request that produced a token its events (a prompt prefilled in chunks, or
//! a sequence preempted for recomputation, produces none until it is done), and finished or
//! cancelled requests are dropped from the shards' batch.
//!
//! Admission follows the shards' per-step prompt budget (`medley_proto::step::StepBudget`:
//! `--max-batch-prefill-tokens`, more with many running requests, `--max-idle-prefill-tokens`
//! when nothing runs): new requests get what the running batch's pending prompt tokens leave of
//! it, and none join while the shards hold requests preempted for lack of KV blocks.

use std::collections::HashMap;
use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tracing::Instrument;

use super::client::ClientError;
use super::guarded::Guarded;
use super::kv::{KvBlocks, KvView};
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
    /// The part of the forward pass until the shard's model returned, before the logits were
    /// read back (on a GPU: the host's time to queue the step).
    pub const LAUNCH: &str = "medley_batch_launch_duration";
    /// The shard's sampling, stopping criteria and detokenization after the forward pass.
    pub const DECODE: &str = "medley_batch_decode_duration";
    /// The shard's whole step, from its engine starting the step to its answer (rank 0's). A
    /// step the shard ran ahead started before the router asked: the router's wait is then
    /// shorter, what is left of the step after the call arrived plus the way there and back.
    pub const SHARD: &str = "medley_batch_shard_duration";
    /// The step as the router waits for it: the call to the shards and their answer.
    pub const STEP: &str = "medley_batch_inference_duration";
}

type Entries = HashMap<u64, Entry>;

/// Runs until the client's tripwire fires (once the batch in hand has failed) or the task is
/// aborted. `kv` receives the shards' KV block pool after every step.
pub(crate) async fn batching_task<S: ShardApi>(
    client: Guarded<S>,
    queue: Scheduler,
    cfg: LoopConfig,
    kv: KvView,
) {
    let budget = cfg.max_batch_total_tokens;
    let mut entries = Entries::new();
    let mut running: Option<pb::CachedBatch> = None;
    // Steps since requests last joined (they join sooner once it reaches max_waiting_tokens).
    let mut waiting_steps = 0usize;
    loop {
        // Drop requests whose client went away before spending a step on them.
        if let Some(batch) = running.take() {
            running = filter_batch(&client, batch, &mut entries).await;
        }
        let next = admission(&cfg, running.as_ref(), waiting_steps, queue.queued())
            .and_then(|b| queue.next_batch(b));
        // The shards' step budget counts the requests still queued here (see `admission`).
        let queued = u32::try_from(queue.queued()).unwrap_or(u32::MAX);
        if let Some(b) = running.as_mut() {
            b.queued = queued;
        }
        running = match (next, running) {
            (Some(next), running) => {
                entries.extend(next.entries);
                let max_tokens = running.as_ref().map_or(0, |b| b.max_tokens);
                let preempted = running.as_ref().map_or(0, |b| b.preempted);
                // Running from the moment the batch is taken (its prefill may take a while).
                record_batch(
                    entries.len(),
                    max_tokens.saturating_add(next.batch.max_tokens),
                    preempted,
                    budget,
                    kv.get(),
                );
                waiting_steps = 1;
                prefill(&client, next.batch, running, &mut entries, &kv).await
            }
            (None, Some(batch)) => {
                waiting_steps += 1;
                decode(&client, batch, &mut entries, &kv).await
            }
            (None, None) => {
                record_batch(0, 0, 0, budget, None);
                tokio::select! {
                    _ = client.until_tripped() => return,
                    _ = queue.wait_for_work() => {}
                }
                None
            }
        };
        match &running {
            Some(b) => record_batch(b.size as usize, b.max_tokens, b.preempted, budget, kv.get()),
            // Nothing runs on the shards: a request they dropped without an end fails
            // (incomplete) instead of waiting forever.
            None => entries.clear(),
        }
    }
}

/// The budget of the requests that may join `running` in the next step (the whole budget when
/// nothing runs); `None` when none may: the batch is full, the shards hold preempted requests
/// (they wait for KV blocks; new requests would only take more), or pending prompt tokens
/// (chunked prompts, preempted sequences) fill the per-step prompt budget. The step budget
/// counts the running requests that decode and those waiting for their first token: in the
/// shards' batch, and the `queued` ones here (the loop sends that count with every step).
pub(crate) fn admission(
    cfg: &LoopConfig,
    running: Option<&pb::CachedBatch>,
    waiting_steps: usize,
    queued: usize,
) -> Option<BatchBudget> {
    let b = &cfg.batching;
    let Some(running) = running else {
        // Nothing decodes: the shards' step takes the idle budget.
        return Some(BatchBudget {
            min_size: None,
            max_size: b.max_batch_size,
            prefill_tokens: b.step_budget().prompt_tokens(0, 0),
            total_tokens: cfg.max_batch_total_tokens,
        });
    };
    let size = running.size as usize;
    // A full batch takes no one; `None` means no size limit.
    let room = b.max_batch_size.map(|m| m.saturating_sub(size));
    // As the shards will count: the running requests that decode, and those waiting for their
    // first token there or here.
    let decoding = running
        .size
        .saturating_sub(running.prefilling)
        .saturating_sub(running.preempted);
    let waiting = running
        .prefilling
        .saturating_add(u32::try_from(queued).unwrap_or(u32::MAX));
    let prefill_tokens = b
        .step_budget()
        .prompt_tokens(decoding, waiting)
        .saturating_sub(running.pending_tokens);
    if room == Some(0) || running.preempted > 0 || prefill_tokens == 0 {
        return None;
    }
    let min_size = (waiting_steps < b.max_waiting_tokens)
        .then(|| (size as f32 * b.waiting_served_ratio).floor() as usize)
        .filter(|m| *m > 0);
    Some(BatchBudget {
        min_size,
        max_size: room,
        prefill_tokens,
        total_tokens: cfg
            .max_batch_total_tokens
            .saturating_sub(running.max_tokens),
    })
}

/// The running batch's gauges: its size (= running requests), the tokens it reserves, its
/// preempted requests, and the KV cache's utilization: the share of the shards' block pool
/// held by running sequences after the latest step (`kv`), or, until a step reported the pool,
/// the share of the KV token budget the batch reserves.
fn record_batch(size: usize, max_tokens: u32, preempted: u32, budget: u32, kv: Option<KvBlocks>) {
    metrics::gauge!(names::BATCH_SIZE).set(size as f64);
    metrics::gauge!(crate::metrics::REQUESTS_RUNNING).set(size as f64);
    metrics::gauge!(names::BATCH_MAX_TOKENS).set(f64::from(max_tokens));
    metrics::gauge!(crate::metrics::REQUESTS_PREEMPTED).set(f64::from(preempted));
    let used = match kv {
        _ if size == 0 => 0.0,
        Some(kv) => kv.utilization(),
        None => (f64::from(max_tokens) / f64::from(budget.max(1))).min(1.0),
    };
    metrics::gauge!(crate::metrics::KV_CACHE_UTILIZATION).set(used);
}

/// What a step answered.
struct Step {
    generations: Vec<pb::Generation>,
    batch: Option<pb::CachedBatch>,
    timings: Option<pb::Timings>,
    kv: Option<pb::KvStats>,
}

impl From<pb::PrefillResponse> for Step {
    fn from(r: pb::PrefillResponse) -> Self {
        Self {
            generations: r.generations,
            batch: r.batch,
            timings: r.timings,
            kv: r.kv,
        }
    }
}

impl From<pb::DecodeResponse> for Step {
    fn from(r: pb::DecodeResponse) -> Self {
        Self {
            generations: r.generations,
            batch: r.batch,
            timings: r.timings,
            kv: r.kv,
        }
    }
}

/// Starts the new `batch` in one step with the `running` batch (decoded in the same step);
/// returns the merged batch.
async fn prefill(
    client: &Guarded<impl ShardApi>,
    mut batch: pb::Batch,
    running: Option<pb::CachedBatch>,
    entries: &mut Entries,
    kv: &KvView,
) -> Option<pb::CachedBatch> {
    let id = batch.id;
    let start = Instant::now();
    let ids: Vec<u64> = std::iter::once(id)
        .chain(running.as_ref().map(|b| b.id))
        .collect();
    // Each new request's prefill span travels with it to the shards; the call itself runs in
    // the first new request's (its `traceparent` metadata).
    let size = batch.requests.len();
    for r in &mut batch.requests {
        if let Some(entry) = entries.get_mut(&r.id) {
            r.traceparent = entry.trace.start_prefill(id, size);
        }
    }
    let call_span = (batch.requests.first())
        .and_then(|r| entries.get(&r.id))
        .map_or_else(tracing::Span::none, |e| e.trace.prefill_span().clone());
    let new_ids: Vec<u64> = batch.requests.iter().map(|r| r.id).collect();
    let kept = running.clone();
    let result = client
        .prefill(batch, running.into_iter().collect())
        .instrument(call_span)
        .await
        .map(Step::from);
    match (result, kept) {
        // The shards check new requests before they touch the running batch: a refused one
        // fails only the new requests, and the running ones go on.
        (Err(ClientError::Rpc(status)), Some(kept))
            if status.code() == tonic::Code::InvalidArgument =>
        {
            tracing::warn!("shards refused new requests: {}", status.message());
            let err = InferError::Generation(status.message().to_string());
            for id in new_ids {
                if let Some(entry) = entries.remove(&id) {
                    entry.trace.failed(&err);
                    let _ = entry.response_tx.send(Err(err.clone()));
                }
            }
            Some(kept)
        }
        (result, _) => end_step(client, result, "prefill", start, &ids, entries, kv).await,
    }
}

/// One step over the running `batch`.
async fn decode(
    client: &Guarded<impl ShardApi>,
    batch: pb::CachedBatch,
    entries: &mut Entries,
    kv: &KvView,
) -> Option<pb::CachedBatch> {
    let start = Instant::now();
    let ids = [batch.id];
    let result = client.decode(vec![batch]).await.map(Step::from);
    end_step(client, result, "decode", start, &ids, entries, kv).await
}

/// Sends a step's generations and returns the shards' next batch, filtered to the requests
/// still alive; when the step failed, fails every request of the batches `ids` and clears
/// them.
async fn end_step(
    client: &Guarded<impl ShardApi>,
    result: Result<Step, ClientError>,
    method: &'static str,
    start: Instant,
    ids: &[u64],
    entries: &mut Entries,
    kv: &KvView,
) -> Option<pb::CachedBatch> {
    match result {
        Ok(step) => {
            record_timings(step.timings.as_ref(), method, start);
            kv.observe(step.kv.as_ref());
            send_generations(step.generations, entries);
            filter_next(client, step.batch, entries).await
        }
        Err(e) => {
            fail_all(client, ids, entries, e).await;
            None
        }
    }
}

fn record_timings(t: Option<&pb::Timings>, method: &'static str, start: Instant) {
    if let Some(t) = t {
        metrics::histogram!(names::FORWARD, "method" => method).record(t.forward_ns as f64 / 1e9);
        metrics::histogram!(names::COMM, "method" => method).record(t.comm_ns as f64 / 1e9);
        metrics::histogram!(names::LAUNCH, "method" => method).record(t.launch_ns as f64 / 1e9);
        metrics::histogram!(names::DECODE, "method" => method).record(t.decode_ns as f64 / 1e9);
        metrics::histogram!(names::SHARD, "method" => method).record(t.total_ns as f64 / 1e9);
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
            fail_all(client, &[batch.id], entries, e).await;
            None
        }
    }
}

/// Fails every entry with the shard's error and clears the batches `batch_ids`.
async fn fail_all(
    client: &Guarded<impl ShardApi>,
    batch_ids: &[u64],
    entries: &mut Entries,
    e: ClientError,
) {
    tracing::error!("shard call failed: {e}");
    for id in batch_ids {
        let _ = client.clear_cache(Some(*id)).await;
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
/// A request's first token ends its prefill (possibly spread over several steps): its decode
/// starts, and its prompt tokens are counted as taken from the prefix cache or computed.
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries) {
    for g in generations {
        let id = g.request_id;
        let Some(entry) = entries.get_mut(&id) else {
            continue;
        };
        let first = !entry.started && g.tokens.as_ref().is_some_and(|t| !t.ids.is_empty());
        if first {
            entry.started = true;
            entry.cached_tokens = g.cached_tokens;
            record_prompt(entry.request.input_length(), g.cached_tokens);
        }
        match send_generation(g, entry) {
            Ok(false) => {
                if first {
                    entry.trace.start_decode();
                }
            }
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

/// Counts a request's prompt tokens once its prefill is done: those its KV came from the
/// shards' prefix cache for, and those computed.
fn record_prompt(input_length: u32, cached: Option<u32>) {
    let cached = cached.unwrap_or(0).min(input_length);
    metrics::counter!(crate::metrics::PREFIX_CACHE_HIT_TOKENS).increment(u64::from(cached));
    metrics::counter!(crate::metrics::PREFILL_COMPUTED_TOKENS)
        .increment(u64::from(input_length - cached));
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
                cached_tokens: entry.cached_tokens,
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
