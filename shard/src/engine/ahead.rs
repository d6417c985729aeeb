//! Decode ahead: right after answering a step, the engine thread runs the next decode step of
//! the batch it kept, before the router asks for it, and holds the result until it does.
//!
//! Between two steps the router gets the answer, hands the tokens to their streams, filters the
//! batch and calls again; the shards wait meanwhile. Run ahead, that time overlaps the next step.
//! The step is the one the router's next `Decode` would run (a token for every sequence, from
//! the same state), so the tokens are the same; only its timing moves:
//! - the next `Decode` of the batch answers with the held generations;
//! - a `Prefill` that the batch joins (or a `Decode` with sequences that were not decoded ahead,
//!   preempted ones) runs its step over every sequence: those decoded ahead get their next
//!   token too, so the answer carries two tokens for each of them (the held one first), and no
//!   forward pass is spent on part of the batch;
//! - a `Filter` drops the held generations of the requests it removes;
//! - a step ahead that failed answers the next call that takes its batch with its error.
//!
//! Only a batch whose every sequence decodes runs ahead: prompt chunks depend on the router's
//! queue, which the engine knows only from the next call. The decision depends on the engine's
//! state alone, so every rank of a tensor-parallel group makes the same one and their
//! collectives stay paired.

use std::time::Instant;

use super::sequence::Sequence;
use super::types::{Generation, StepTimings};
use super::{BatchState, Engine, EngineError};

/// What a step run ahead left for its batch's next call.
pub(super) enum Ahead {
    /// The step's generations: one per sequence it advanced.
    Done {
        generations: Vec<Generation>,
        timings: StepTimings,
    },
    /// The step failed; its sequences were freed.
    Failed {
        error: EngineError,
        request_ids: Vec<u64>,
    },
}

impl Ahead {
    /// The requests it answers for whose sequences are gone (finished, or freed by the failure).
    pub(super) fn ended_ids<'a>(&'a self, seqs: &'a [Sequence]) -> impl Iterator<Item = u64> + 'a {
        let ids: Vec<u64> = match self {
            Ahead::Done { generations, .. } => generations.iter().map(|g| g.request_id).collect(),
            Ahead::Failed { request_ids, .. } => request_ids.clone(),
        };
        ids.into_iter()
            .filter(move |id| !seqs.iter().any(|s| s.id == *id))
    }

    /// Keeps only what concerns `request_ids`; false when nothing is left.
    pub(super) fn retain(&mut self, request_ids: &[u64]) -> bool {
        match self {
            Ahead::Done { generations, .. } => {
                generations.retain(|g| request_ids.contains(&g.request_id));
                !generations.is_empty()
            }
            Ahead::Failed {
                request_ids: ids, ..
            } => {
                ids.retain(|id| request_ids.contains(id));
                !ids.is_empty()
            }
        }
    }
}

/// What the steps run ahead of a call's batches hand to it.
#[derive(Default)]
pub(super) struct Delivered {
    /// Their generations, batch by batch.
    pub generations: Vec<Generation>,
    /// The timings of the last of them.
    pub timings: Option<StepTimings>,
    /// The first failure among them.
    pub failure: Option<EngineError>,
}

impl Delivered {
    /// Adds one batch's step ahead.
    pub(super) fn add(&mut self, ahead: Ahead) {
        match ahead {
            Ahead::Done {
                generations,
                timings,
            } => {
                self.generations.extend(generations);
                self.timings = Some(timings);
            }
            Ahead::Failed { error, .. } => {
                self.failure.get_or_insert(error);
            }
        }
    }
}

impl Engine {
    /// Generations that steps run ahead hold for their batches' next calls (for tests).
    pub fn held_ahead(&self) -> usize {
        self.batches
            .values()
            .map(|b| match &b.ahead {
                Some(Ahead::Done { generations, .. }) => generations.len(),
                _ => 0,
            })
            .sum()
    }

    /// Runs the next decode step of the batch the last prefill or decode kept, if every one of
    /// its sequences decodes, and holds the result for the batch's next call (see the module
    /// documentation). The engine thread calls it after answering that step.
    pub fn decode_ahead(&mut self) {
        let Some(id) = self.last_kept.take() else {
            return;
        };
        let ready = self.batches.get(&id).is_some_and(|b| {
            b.ahead.is_none()
                && !b.seqs.is_empty()
                && b.seqs.iter().all(|s| s.decoding() && !s.preempted)
        });
        if !ready {
            return;
        }
        let Some(state) = self.batches.remove(&id) else {
            return;
        };
        let start = Instant::now();
        let request_ids: Vec<u64> = state.seqs.iter().map(|s| s.id).collect();
        let (seqs, ahead) = match self.step(state.seqs, 0) {
            Ok((generations, kept, mut timings)) => {
                timings.comm_ns = self.model.take_comm_ns();
                timings.total_ns = start.elapsed().as_nanos() as u64;
                let ahead = Ahead::Done {
                    generations,
                    timings,
                };
                (kept, ahead)
            }
            Err(error) => {
                tracing::debug!(batch = id, "step run ahead failed: {error}");
                (vec![], Ahead::Failed { error, request_ids })
            }
        };
        self.batches.insert(
            id,
            BatchState {
                seqs,
                ahead: Some(ahead),
            },
        );
    }
}
