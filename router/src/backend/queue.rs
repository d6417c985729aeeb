//! The waiting queue and the batch builder: which waiting requests join the next prefill, under
//! the prefill-token, total-token and batch-size budgets (TGI v3 policy, FIFO, no preemption).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use medley_proto::shard::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::InferError;
use crate::infer::{InferStreamResponse, ValidGenerateRequest};

/// A request with the channel its events go to.
pub(crate) struct Entry {
    /// The validated request.
    pub request: ValidGenerateRequest,
    /// Where its events go; closed when the client went away.
    pub response_tx: UnboundedSender<Result<InferStreamResponse, InferError>>,
    /// When it was queued.
    pub queued: Instant,
    /// When its prefill started.
    pub batch_time: Option<Instant>,
}

impl Entry {
    /// Tokens this request may hold in the KV cache.
    pub fn max_tokens(&self) -> u32 {
        self.request.input_length() + self.request.stopping_parameters.max_new_tokens
    }
}

/// Budgets for one `next_batch` call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchBudget {
    /// Don't form a batch smaller than this (None = any size).
    pub min_size: Option<usize>,
    /// Don't form a batch larger than this.
    pub max_size: Option<usize>,
    /// Sum of prompt tokens of the batch.
    pub prefill_tokens: u32,
    /// Sum of prompt + max new tokens of the batch.
    pub total_tokens: u32,
}

/// A batch ready for prefill.
pub(crate) struct NextBatch {
    /// Its entries by request id.
    pub entries: HashMap<u64, Entry>,
    /// The wire batch.
    pub batch: pb::Batch,
}

#[derive(Default)]
struct State {
    entries: VecDeque<(u64, Entry)>,
    next_id: u64,
    next_batch_id: u64,
}

/// FIFO of waiting requests.
#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a request; returns its id.
    pub fn append(&self, entry: Entry) -> u64 {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.entries.push_back((id, entry));
        id
    }

    /// Number of waiting requests.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Takes waiting requests in FIFO order while they fit the budget. Requests whose client is
    /// gone are dropped on the way.
    pub fn next_batch(&self, budget: BatchBudget) -> Option<NextBatch> {
        let mut s = self.lock();
        s.entries.retain(|(_, e)| !e.response_tx.is_closed());
        if s.entries.is_empty() {
            return None;
        }
        let mut taken: Vec<(u64, Entry)> = vec![];
        let mut prefill = 0u32;
        let mut total = 0u32;
        while let Some((id, entry)) = s.entries.pop_front() {
            let input = entry.request.input_length();
            let max = entry.max_tokens();
            let too_big = prefill.saturating_add(input) > budget.prefill_tokens
                || total.saturating_add(max) > budget.total_tokens
                || budget.max_size.is_some_and(|m| taken.len() >= m);
            if too_big {
                s.entries.push_front((id, entry));
                break;
            }
            prefill += input;
            total += max;
            taken.push((id, entry));
        }
        if taken.is_empty() || budget.min_size.is_some_and(|m| taken.len() < m) {
            for e in taken.into_iter().rev() {
                s.entries.push_front(e);
            }
            return None;
        }
        let batch_id = s.next_batch_id;
        s.next_batch_id += 1;
        drop(s);
        let now = Instant::now();
        let requests = taken
            .iter()
            .map(|(id, e)| to_proto_request(*id, &e.request))
            .collect::<Vec<_>>();
        let entries = taken
            .into_iter()
            .map(|(id, mut e)| {
                e.batch_time = Some(now);
                (id, e)
            })
            .collect::<HashMap<_, _>>();
        Some(NextBatch {
            batch: pb::Batch {
                id: batch_id,
                size: requests.len() as u32,
                max_tokens: total,
                requests,
            },
            entries,
        })
    }
}

/// The shard's view of a request.
fn to_proto_request(id: u64, r: &ValidGenerateRequest) -> pb::Request {
    let p = &r.parameters;
    let s = &r.stopping_parameters;
    pb::Request {
        id,
        input_ids: r.input_ids.clone(),
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            typical_p: p.typical_p,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: s.max_new_tokens,
            stop_sequences: s.stop_sequences.clone(),
            ignore_eos_token: s.ignore_eos_token,
        }),
        prefill_logprobs: r.decoder_input_details,
        top_n_tokens: r.top_n_tokens,
        adapter_slot: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{AdapterSpec, ValidParameters, ValidStoppingParameters};

    fn request(input: usize, max_new: u32) -> ValidGenerateRequest {
        ValidGenerateRequest {
            inputs: "x".into(),
            input_ids: vec![1; input],
            parameters: ValidParameters {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                typical_p: 1.0,
                do_sample: false,
                seed: 0,
                repetition_penalty: 1.0,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
            },
            stopping_parameters: ValidStoppingParameters {
                max_new_tokens: max_new,
                stop_sequences: vec![],
                ignore_eos_token: false,
            },
            decoder_input_details: false,
            top_n_tokens: 0,
            adapter: AdapterSpec::Base,
        }
    }

    fn push(
        q: &Queue,
        input: usize,
        max_new: u32,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        q.append(Entry {
            request: request(input, max_new),
            response_tx: tx,
            queued: Instant::now(),
            batch_time: None,
        });
        rx
    }

    fn budget(prefill: u32, total: u32) -> BatchBudget {
        BatchBudget {
            min_size: None,
            max_size: None,
            prefill_tokens: prefill,
            total_tokens: total,
        }
    }

    #[test]
    fn respects_token_budgets_in_fifo_order() {
        let q = Queue::default();
        let _r: Vec<_> = [(10, 10), (10, 10), (10, 10)]
            .iter()
            .map(|(i, m)| push(&q, *i, *m))
            .collect();
        let b = q.next_batch(budget(25, 1000)).unwrap();
        assert_eq!(
            b.batch.requests.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(b.batch.max_tokens, 40);
        assert_eq!(q.len(), 1);
        let b = q.next_batch(budget(100, 15)).map(|b| b.batch.size);
        assert_eq!(b, None, "20 total tokens do not fit 15");
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn min_and_max_size() {
        let q = Queue::default();
        let _r: Vec<_> = (0..3).map(|_| push(&q, 1, 1)).collect();
        let mut b = budget(100, 100);
        b.min_size = Some(4);
        assert!(q.next_batch(b).is_none());
        assert_eq!(q.len(), 3);
        b.min_size = None;
        b.max_size = Some(2);
        assert_eq!(q.next_batch(b).unwrap().batch.size, 2);
    }

    #[test]
    fn cancelled_requests_are_dropped() {
        let q = Queue::default();
        let r0 = push(&q, 1, 1);
        let _r1 = push(&q, 1, 1);
        drop(r0);
        let b = q.next_batch(budget(100, 100)).unwrap();
        assert_eq!(
            b.batch.requests.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![1]
        );
    }
}
