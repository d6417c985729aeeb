//! A step's logits as the samplers read them: every row read back to the host, or, when every
//! scheduled sequence only needs the argmax ([`super::Sequence::argmax_only`]), each row's greedy
//! choice made on the device ([`crate::model::device_greedy`]), which reads back two words a
//! row instead of the vocabulary.

use candle_core::Tensor;

use super::schedule::Scheduled;

/// The logits of one step on the host.
pub(crate) enum StepLogits {
    /// Every returned row, flattened (f32).
    Rows(Vec<f32>),
    /// Each row's greedy `(id, log-probability)`, one row per scheduled chunk.
    Chosen(Vec<(u32, f32)>),
}

/// What one scheduled chunk's sampler reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowInput<'a> {
    /// The chunk's logits rows (all of its rows when it asked for prompt logprobs, else one).
    Logits(&'a [f32]),
    /// The device's choice: the token and its log-probability.
    Chosen(u32, f32),
}

#[cfg(any(test, feature = "testing"))]
thread_local! {
    static HOST_CHOICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static HOST_CHOICE_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Tests: on this thread, make the device's greedy choices on the host when the device cannot
/// (the CPU), so that the engine's device-choice path runs without a GPU. Returns the steps
/// that took that path on this thread so far.
#[cfg(any(test, feature = "testing"))]
pub fn choose_on_host(on: bool) -> usize {
    HOST_CHOICE.set(on);
    HOST_CHOICE_STEPS.get()
}

/// Reads `logits` (`[rows, vocab]`, f32) back for the samplers: the device's greedy choices
/// when `argmax_only` and the device makes them, else every row.
pub(crate) fn read_logits(logits: &Tensor, argmax_only: bool) -> candle_core::Result<StepLogits> {
    if argmax_only {
        if let Some(chosen) = crate::model::device_greedy(logits)? {
            return Ok(StepLogits::Chosen(chosen));
        }
        #[cfg(any(test, feature = "testing"))]
        if HOST_CHOICE.get() {
            let mut sampler = crate::generation::Sampler::greedy();
            let rows = logits.to_vec2::<f32>()?;
            let chosen = rows.iter().map(|r| sampler.next(r, &[], 0));
            HOST_CHOICE_STEPS.set(HOST_CHOICE_STEPS.get() + 1);
            return Ok(StepLogits::Chosen(
                chosen.map(|s| (s.id, s.logprob)).collect(),
            ));
        }
    }
    Ok(StepLogits::Rows(logits.flatten_all()?.to_vec1::<f32>()?))
}

/// Each scheduled chunk's input from `logits` (in `scheduled`'s order), or why they do not
/// match the step.
pub(crate) fn row_inputs<'a>(
    logits: &'a StepLogits,
    scheduled: &[Scheduled],
    vocab: usize,
) -> Result<Vec<RowInput<'a>>, String> {
    let rows_of = |c: &Scheduled| if c.all_logits { c.len } else { 1 };
    match logits {
        StepLogits::Rows(all) => {
            let needed: usize = scheduled.iter().map(|c| rows_of(c) * vocab).sum();
            if all.len() != needed {
                return Err(format!("{} logits, expected {needed}", all.len()));
            }
            let mut rest = all.as_slice();
            Ok(scheduled
                .iter()
                .map(|c| {
                    let (block, tail) = rest.split_at(rows_of(c) * vocab);
                    rest = tail;
                    RowInput::Logits(block)
                })
                .collect())
        }
        StepLogits::Chosen(chosen) => {
            if chosen.len() != scheduled.len() || scheduled.iter().any(|c| c.all_logits) {
                return Err(format!(
                    "{} device choices for {} chunks",
                    chosen.len(),
                    scheduled.len()
                ));
            }
            chosen
                .iter()
                .map(|&(id, logprob)| match id as usize {
                    i if i < vocab => Ok(RowInput::Chosen(id, logprob)),
                    _ => Err(format!(
                        "the device chose token {id}, outside the vocabulary of {vocab}"
                    )),
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: usize, len: usize, all_logits: bool) -> Scheduled {
        Scheduled {
            index,
            start: 0,
            len,
            all_logits,
        }
    }

    #[test]
    fn rows_are_split_per_chunk() {
        let logits = StepLogits::Rows((0..12).map(|v| v as f32).collect());
        let scheduled = [chunk(0, 2, true), chunk(1, 5, false)];
        let rows = row_inputs(&logits, &scheduled, 4).unwrap();
        match rows.as_slice() {
            [RowInput::Logits(a), RowInput::Logits(b)] => {
                assert_eq!((a.len(), b.len()), (8, 4));
                assert_eq!(b[0], 8.0);
            }
            other => panic!("{other:?}"),
        }
        let short = StepLogits::Rows(vec![0.0; 11]);
        assert!(
            row_inputs(&short, &scheduled, 4)
                .unwrap_err()
                .contains("11 logits")
        );
    }

    #[test]
    fn device_choices_need_one_per_chunk_no_prompt_rows_and_ids_in_the_vocabulary() {
        let chosen = StepLogits::Chosen(vec![(3, -0.5), (7, -1.0)]);
        let rows = row_inputs(&chosen, &[chunk(0, 1, false), chunk(1, 4, false)], 8).unwrap();
        assert!(matches!(rows[1], RowInput::Chosen(7, lp) if lp == -1.0));
        assert!(row_inputs(&chosen, &[chunk(0, 1, false)], 8).is_err());
        assert!(row_inputs(&chosen, &[chunk(0, 2, true), chunk(1, 1, false)], 8).is_err());
        let beyond = row_inputs(&chosen, &[chunk(0, 1, false), chunk(1, 1, false)], 5);
        assert!(
            beyond
                .unwrap_err()
                .contains("token 7, outside the vocabulary of 5")
        );
    }
}
