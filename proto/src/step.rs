//! The per-step prompt budget of chunked prefill: a contract between the router, whose
//! admission predicts how many prompt tokens the next shard step takes, and the shards, whose
//! scheduler applies it. One rule, here, so the two can never disagree; the requests it counts
//! as waiting include those still queued in the router, whose count the router sends with
//! every step (`CachedBatch.queued`).

/// Prompt rows a step may carry per request in it (decoding, or waiting for its first token)
/// beyond the busy budget. Where a step's cost grows with its rows (CPUs), a step that joins one
/// prompt to many decoding streams then costs at most about three decode-only steps.
pub const PROMPT_ROWS_PER_REQUEST: u32 = 2;

/// Prompt tokens one shard step may compute, from the router's warm-up
/// (`--max-batch-prefill-tokens`, `--max-idle-prefill-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    /// While sequences decode in the step (at least; see [`Self::prompt_tokens`]); positive.
    pub busy: u32,
    /// When no sequence decodes in it (nobody's stream waits on it); at least `busy`.
    pub idle: u32,
}

impl StepBudget {
    /// `busy` of 0 means 1; `idle` below `busy` (0 included) means `busy`.
    pub fn new(busy: u32, idle: u32) -> Self {
        let busy = busy.max(1);
        Self {
            busy,
            idle: idle.max(busy),
        }
    }

    /// Prompt tokens of a step that decodes `decoding` sequences while `waiting` requests wait
    /// for their first token (their prompts being prefilled, or queued): the idle budget when
    /// none decodes or more requests wait than decode (a burst: the many waiting requests
    /// would otherwise wait for dozens of small chunks, the few decoding streams wait for a few
    /// long steps), else [`PROMPT_ROWS_PER_REQUEST`] per request scaled by the ratio of all
    /// requests to the decoding ones (`2 (d + w)² / d`: a lone newcomer barely moves it, a
    /// crowd of them grows it towards the burst's idle budget without a jump), at least the
    /// busy budget and at most the idle one.
    pub fn prompt_tokens(self, decoding: u32, waiting: u32) -> u32 {
        if decoding == 0 || waiting > decoding {
            self.idle
        } else {
            let all = u128::from(decoding) + u128::from(waiting);
            let rows = u128::from(PROMPT_ROWS_PER_REQUEST) * all * all / u128::from(decoding);
            u32::try_from(rows)
                .unwrap_or(u32::MAX)
                .clamp(self.busy, self.idle)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StepBudget;

    #[test]
    fn the_prompt_budget_grows_with_the_requests_between_busy_and_idle() {
        let b = StepBudget::new(32, 512);
        assert_eq!(
            b.prompt_tokens(0, 50),
            512,
            "nothing decodes: the idle budget"
        );
        assert_eq!(b.prompt_tokens(1, 0), 32);
        assert_eq!(b.prompt_tokens(16, 0), 32);
        assert_eq!(b.prompt_tokens(16, 1), 36, "one prompt joining 16 streams");
        assert_eq!(b.prompt_tokens(64, 0), 128);
        assert_eq!(b.prompt_tokens(60, 4), 136, "the waiting count too");
        assert_eq!(b.prompt_tokens(40, 24), 204, "more so the more wait");
        assert_eq!(b.prompt_tokens(40, 40), 320);
        assert_eq!(b.prompt_tokens(64, 64), 512);
        assert_eq!(
            b.prompt_tokens(13, 51),
            512,
            "a burst: more wait than decode"
        );
        assert_eq!(b.prompt_tokens(1, 2), 512);
        assert_eq!(b.prompt_tokens(1000, 0), 512);
        assert_eq!(b.prompt_tokens(u32::MAX, u32::MAX), 512, "no overflow");
        let gpu = StepBudget::new(2048, 0);
        assert_eq!(
            (gpu.prompt_tokens(0, 0), gpu.prompt_tokens(64, 0)),
            (2048, 2048)
        );
        assert_eq!(StepBudget::new(0, 0), StepBudget { busy: 1, idle: 1 });
    }
}
