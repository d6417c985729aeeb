//! What one forward step computes: a decode row for every sequence that has sampled its
//! last token, and prompt chunks (or recomputation after a preemption) within the per-step
//! prompt-token budget (`medley_proto::step::StepBudget::prompt_tokens`): it bounds how long the decoding
//! sequences' streams wait for a step that carries prompt chunks, and grows with the number of
//! those streams (so admission keeps up with many of them) up to the idle budget, which a step
//! without decodes takes whole. Blocks are reserved here, oldest sequence first; when the pool is
//! short, the newest sequences holding blocks are preempted (their blocks freed, their
//! tokens kept) and recomputed in a later step.

use crate::kv_cache::{KvCache, KvCacheError};
use crate::model::SeqChunk;

use super::EngineError;
use super::sequence::Sequence;

pub(crate) use medley_proto::step::StepBudget;

/// The budget of a step over `seqs`: by its decoding sequences and the requests waiting for
/// their first token, those still prefilling here (preempted ones wait for blocks, not for
/// this step) and the `queued` ones of the router.
fn step_budget(budget: StepBudget, seqs: &[Sequence], queued: u32) -> usize {
    let count = |f: fn(&Sequence) -> bool| {
        let n = seqs.iter().filter(|s| !s.preempted && f(s)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    };
    let waiting = count(|s| !s.decoding()).saturating_add(queued);
    budget.prompt_tokens(count(Sequence::decoding), waiting) as usize
}

/// What a step plan says about one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    /// Index of the sequence in the step's list.
    pub index: usize,
    /// Position of the first token fed.
    pub start: usize,
    /// Tokens fed.
    pub len: usize,
    /// Logits of every row are returned (prompt logprobs).
    pub all_logits: bool,
}

/// The step: chunks in the order of `scheduled`.
#[derive(Debug, Default)]
pub(crate) struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    pub chunks: Vec<SeqChunk>,
    /// Sequences preempted while planning.
    pub preempted: usize,
}

/// Plans one step over `seqs` (in arrival order) within `budget`'s prompt tokens, while
/// `queued` requests wait in the router's queues. Resumes preempted sequences first (through
/// the prefix cache), then reserves blocks in arrival order.
pub(crate) fn plan_step(
    seqs: &mut [Sequence],
    kv: &mut KvCache,
    budget: StepBudget,
    queued: u32,
) -> Result<StepPlan, EngineError> {
    let mut plan = StepPlan::default();
    let mut budget = step_budget(budget, seqs, queued);
    for i in 0..seqs.len() {
        let resumed = seqs[i].preempted;
        if resumed {
            if budget == 0 {
                continue;
            }
            resume(&mut seqs[i], kv)?;
        }
        let s = &seqs[i];
        let decoding = s.decoding();
        let want = if decoding { 1 } else { s.pending().min(budget) };
        let fitted = match want {
            0 => None,
            _ => fit(seqs, i, want, decoding, kv, &mut plan)?,
        };
        let Some(len) = fitted else {
            if resumed {
                // Still no room: back to waiting, without holding cached blocks.
                kv.free(seqs[i].id);
                seqs[i].computed = 0;
                seqs[i].preempted = true;
            }
            continue;
        };
        let s = &seqs[i];
        kv.reserve(s.id, s.computed + len).map_err(kv_error)?;
        if !decoding {
            budget -= len;
        }
        let all_logits = s.wants_prompt_rows(s.computed);
        plan.scheduled.push(Scheduled {
            index: i,
            start: s.computed,
            len,
            all_logits,
        });
        plan.chunks.push(SeqChunk {
            seq_id: s.id,
            tokens: s.tokens[s.computed..s.computed + len].to_vec(),
            start_pos: s.computed,
            adapter_slot: s.adapter_slot,
            all_logits,
        });
    }
    Ok(plan)
}

/// How many of `want` tokens of sequence `i` can get blocks: all of them, after preempting
/// newer sequences if needed; a prompt chunk may instead shrink to the blocks left.
/// `None` when it cannot run this step.
fn fit(
    seqs: &mut [Sequence],
    i: usize,
    want: usize,
    decoding: bool,
    kv: &mut KvCache,
    plan: &mut StepPlan,
) -> Result<Option<usize>, EngineError> {
    let (id, computed) = (seqs[i].id, seqs[i].computed);
    loop {
        let needed = kv.blocks_needed(id, computed + want).map_err(kv_error)?;
        let available = kv.available_blocks();
        if needed <= available {
            return Ok(Some(want));
        }
        // The padding rows of CUDA graph steps give their block back first.
        if kv.release_pad_block() {
            continue;
        }
        if !decoding {
            // A prompt chunk takes what fits in the blocks left, if anything.
            let room = room(kv, id, computed, want)?;
            if room > 0 {
                return Ok(Some(room));
            }
        }
        // Preempt the newest sequence (after `i`) that holds blocks.
        let Some(victim) = (i + 1..seqs.len())
            .rev()
            .find(|&j| !seqs[j].preempted && kv.blocks(seqs[j].id).is_some_and(|b| !b.is_empty()))
        else {
            return Ok(None);
        };
        preempt(&mut seqs[victim], kv);
        plan.preempted += 1;
    }
}

/// Largest `n <= want` whose blocks are available.
fn room(kv: &KvCache, id: u64, computed: usize, want: usize) -> Result<usize, EngineError> {
    let held = kv.blocks(id).map_or(0, <[u32]>::len);
    let cap = (held + kv.available_blocks()) * kv.block_tokens();
    let mut n = want.min(cap.saturating_sub(computed));
    // A shared partial block to copy takes one more.
    while n > 0 && kv.blocks_needed(id, computed + n).map_err(kv_error)? > kv.available_blocks() {
        n -= 1;
    }
    Ok(n)
}

/// Frees `s`'s blocks (the full ones stay in the prefix cache) and marks it for
/// recomputation.
pub(crate) fn preempt(s: &mut Sequence, kv: &mut KvCache) {
    kv.free(s.id);
    s.computed = 0;
    s.preempted = true;
    s.preemptions += 1;
    tracing::debug!(
        request = s.id,
        tokens = s.tokens.len(),
        preemptions = s.preemptions,
        "sequence preempted: kv pool full"
    );
}

/// Gives a preempted sequence a KV entry again, taking what the prefix cache still holds.
fn resume(s: &mut Sequence, kv: &mut KvCache) -> Result<(), EngineError> {
    let cached = allocate(s, kv).map_err(kv_error)?;
    s.computed = cached;
    s.preempted = false;
    tracing::debug!(request = s.id, cached, "preempted sequence resumed");
    Ok(())
}

/// Gives `s` a KV entry holding what the prefix cache has of its tokens; returns those tokens.
/// A sequence that still wants its prompt logprobs needs every prompt row computed, so it takes
/// nothing from the cache.
pub(crate) fn allocate(s: &Sequence, kv: &mut KvCache) -> Result<usize, KvCacheError> {
    if s.prefill_logprobs && s.generated() == 0 {
        kv.allocate(s.id, s.max_tokens).map(|_| 0)
    } else {
        kv.allocate_cached(s.id, s.max_tokens, s.identity, &s.tokens)
    }
}

fn kv_error(e: KvCacheError) -> EngineError {
    EngineError::KvCache(e.to_string())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::engine::sequence::SeqLimits;
    use crate::engine::types::Request;
    use crate::generation::{SamplingParams, StopParams};
    use crate::kv_cache::KvCacheConfig;
    use crate::kv_cache::prefix::AdapterIdentity;

    fn sequence(id: u64, prompt: usize) -> Sequence {
        let req = Request {
            id,
            input_ids: (1..=prompt as u32).collect(),
            sampling: SamplingParams::default(),
            stopping: StopParams {
                max_new_tokens: 64,
                ..StopParams::default()
            },
            prefill_logprobs: false,
            top_n_tokens: 0,
            adapter_slot: 0,
        };
        let limits = SeqLimits {
            vocab_size: 64,
            max_positions: 256,
            eos_token_ids: &[],
        };
        Sequence::new(&req, id, AdapterIdentity::BASE, limits).expect("sequence")
    }

    /// A pool of 4 blocks of 4 tokens, one of them the pad block of CUDA graph steps: two
    /// prompts of 8 tokens get their blocks, the pad block first given back, no one preempted.
    #[test]
    fn the_pad_block_is_given_back_before_anyone_is_preempted() {
        let cfg = crate::fixture::tiny_config();
        let config = KvCacheConfig {
            capacity_tokens: 16,
            block_tokens: 4,
            prefix_caching: false,
        };
        let mut kv = KvCache::new(&cfg, DType::F32, &Device::Cpu, config).expect("kv");
        let mut seqs = vec![sequence(1, 8), sequence(2, 8)];
        for s in &seqs {
            allocate(s, &mut kv).expect("allocate");
        }
        let pad = kv.pad_block().expect("a free block");
        let budget = StepBudget::new(64, 64);
        let plan = plan_step(&mut seqs, &mut kv, budget, 0).expect("plan");
        assert_eq!(plan.preempted, 0);
        assert_eq!(
            plan.chunks.iter().map(|c| c.tokens.len()).sum::<usize>(),
            16
        );
        assert_eq!(kv.held_pad_block(), None);
        assert!(
            kv.blocks(1)
                .into_iter()
                .chain(kv.blocks(2))
                .flatten()
                .any(|&b| b == pad)
        );
    }
}
