//! The host's part of a step after the forward pass: each scheduled sequence advanced from
//! its logits rows (or the device's choice), on the model's pool when that pays.

use rayon::prelude::*;

use super::schedule::Scheduled;
use super::sequence::{Sequence, StepOutput};
use super::step_logits::{RowInput, StepLogits, row_inputs};
use super::{Engine, EngineError};

/// The outcome of one scheduled sequence in a step.
type SampleResult = Result<Option<StepOutput>, EngineError>;

impl Engine {
    /// Advances every scheduled sequence from its logits rows: prompt logprobs from the
    /// rows of a chunk that asked for them, and a sampled token for each sequence whose
    /// tokens are now all computed. Runs in parallel over the sequences on the model's pool when
    /// some row is sampled on the host (rows the device chose run in turn).
    /// Returns `(index, output)` per scheduled sequence, `None` for a chunk that did not
    /// reach the end of its sequence.
    pub(super) fn sample_all(
        &self,
        seqs: &mut [Sequence],
        scheduled: &[Scheduled],
        logits: &StepLogits,
    ) -> Vec<(usize, SampleResult)> {
        let vocab = self.vocab();
        let max_positions = self.max_positions();
        let text = &self.text;
        let rows = match row_inputs(logits, scheduled, vocab) {
            Ok(rows) => rows,
            Err(msg) => {
                return scheduled
                    .iter()
                    .map(|c| (c.index, Err(EngineError::Model(msg.clone()))))
                    .collect();
            }
        };
        // Pair each scheduled chunk with its sequence and logits rows.
        let mut work = Vec::with_capacity(scheduled.len());
        let mut slots: Vec<Option<&mut Sequence>> = seqs.iter_mut().map(Some).collect();
        for (c, row) in scheduled.iter().zip(rows) {
            if let Some(s) = slots.get_mut(c.index).and_then(Option::take) {
                work.push((*c, s, row));
            }
        }
        let run = |(c, s, row): (Scheduled, &mut Sequence, RowInput<'_>)| {
            if let (true, RowInput::Logits(block)) = (c.all_logits, row) {
                s.take_prompt_rows(block, vocab, c.start);
            }
            s.computed = c.start + c.len;
            if s.pending() > 0 {
                return (c.index, Ok(None));
            }
            let first = s.generated() == 0;
            let stepped = match row {
                RowInput::Logits(block) => {
                    s.step(&block[block.len() - vocab..], text, max_positions)
                }
                RowInput::Chosen(id, logprob) => s.step_chosen(id, logprob, text, max_positions),
            };
            let out = stepped.map(|mut out| {
                if first {
                    if s.prefill_logprobs {
                        out.generation.prefill_tokens = Some(s.prompt_tokens(text));
                    }
                    out.generation.cached_tokens = Some(s.cached_tokens as u32);
                }
                Some(out)
            });
            (c.index, out)
        };
        // A row the device chose costs the host a token's detokenization: waking the pool for
        // those costs more than it saves. Sampling from logits rows is worth spreading.
        let host_sampling = work
            .iter()
            .any(|(_, _, row)| matches!(row, RowInput::Logits(_)));
        if work.len() < 2 || !host_sampling {
            return work.into_iter().map(run).collect();
        }
        self.model
            .device()
            .with_context(|| work.into_par_iter().map(run).collect())
    }
}
