//! One running request on the shard: its tokens, sampler, stopping criteria and detokenizer.

use crate::generation::{FinishReason, IncrementalDecoder, Sample, Sampler, StoppingCriteria};
use crate::kv_cache::AdapterIdentity;

use super::types::{GeneratedText, Generation, Request, Tokens};
use super::{EngineError, TextContext};

/// State of one sequence between steps.
pub(crate) struct Sequence {
    /// Router-assigned request id (also the KV-cache key).
    pub id: u64,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_len: usize,
    /// Adapter slot (0 = base).
    pub adapter_slot: u32,
    /// Alternatives to report per token.
    pub top_n: usize,
    /// Tokens reserved in the KV cache (prompt + max new tokens).
    pub max_tokens: usize,
    /// Return prompt logprobs at prefill.
    pub prefill_logprobs: bool,
    /// Order of arrival on the shard (older sequences are scheduled first, newer ones are
    /// preempted first).
    pub arrival: u64,
    /// Tokens whose keys and values are in the KV cache (0 while preempted).
    pub computed: usize,
    /// True between a preemption (blocks freed) and the step that resumes it.
    pub preempted: bool,
    /// Times this sequence was preempted.
    pub preemptions: u32,
    /// What its keys and values depend on besides the tokens (the adapter slot's weights).
    pub identity: AdapterIdentity,
    /// Prompt tokens found in the prefix cache when the sequence arrived.
    pub cached_tokens: usize,
    /// Logprob of each prompt token computed so far (NaN for the first).
    prompt_logprobs: Vec<f32>,
    sampler: Sampler,
    stopping: StoppingCriteria,
    decoder: IncrementalDecoder,
    seed: u64,
}

/// What a request is checked against when its sequence is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqLimits<'a> {
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// Positions the model can attend over.
    pub max_positions: usize,
    /// Ids that end generation.
    pub eos_token_ids: &'a [u32],
}

/// What one step produced for a sequence.
pub(crate) struct StepOutput {
    /// What the step reports for the sequence.
    pub generation: Generation,
    /// True when the sequence is done and must be freed.
    pub finished: bool,
}

impl Sequence {
    /// Validates a request and builds its state.
    pub fn new(
        req: &Request,
        arrival: u64,
        identity: AdapterIdentity,
        limits: SeqLimits<'_>,
    ) -> Result<Self, EngineError> {
        let SeqLimits {
            vocab_size,
            max_positions,
            eos_token_ids,
        } = limits;
        if req.input_ids.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "request {} has no input tokens",
                req.id
            )));
        }
        if let Some(bad) = req.input_ids.iter().find(|t| **t as usize >= vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "request {}: token id {bad} is outside the vocabulary ({vocab_size})",
                req.id
            )));
        }
        let stop = &req.stopping;
        if stop.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "request {}: max_new_tokens must be positive",
                req.id
            )));
        }
        let prompt_len = req.input_ids.len();
        let max_tokens = prompt_len + stop.max_new_tokens as usize;
        if prompt_len >= max_positions {
            return Err(EngineError::InvalidRequest(format!(
                "request {}: {prompt_len} prompt tokens exceed the model's {max_positions} positions",
                req.id
            )));
        }
        let seed = req.sampling.seed;
        let sampler = Sampler::new(req.sampling)
            .map_err(|e| EngineError::InvalidRequest(format!("request {}: {e}", req.id)))?;
        Ok(Self {
            id: req.id,
            tokens: req.input_ids.clone(),
            prompt_len,
            adapter_slot: req.adapter_slot,
            top_n: req.top_n_tokens as usize,
            max_tokens: max_tokens.min(max_positions),
            prefill_logprobs: req.prefill_logprobs,
            arrival,
            computed: 0,
            preempted: false,
            preemptions: 0,
            identity,
            cached_tokens: 0,
            prompt_logprobs: vec![f32::NAN],
            sampler,
            stopping: StoppingCriteria::new(req.stopping.clone(), eos_token_ids.to_vec()),
            decoder: IncrementalDecoder::new(&req.input_ids),
            seed,
        })
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether the next token depends on the logits only through their argmax and its
    /// log-probability (greedy, no penalty, no alternatives reported): then the device may
    /// choose it ([`Sequence::step_chosen`]) and the logits need not be read back.
    pub fn argmax_only(&self) -> bool {
        self.sampler.is_greedy() && !self.sampler.params().has_penalties() && self.top_n == 0
    }

    /// Samples the next token from `logits`, updates every criterion and builds the generation.
    pub fn step(
        &mut self,
        logits: &[f32],
        ctx: &TextContext,
        max_positions: usize,
    ) -> Result<StepOutput, EngineError> {
        let sample = self.sampler.next(logits, &self.tokens, self.top_n);
        self.advance(sample, ctx, max_positions)
    }

    /// Takes `id`, chosen on the device with its `logprob` (see [`Sequence::argmax_only`]), as
    /// the next token, like [`Sequence::step`].
    pub fn step_chosen(
        &mut self,
        id: u32,
        logprob: f32,
        ctx: &TextContext,
        max_positions: usize,
    ) -> Result<StepOutput, EngineError> {
        let top = Vec::new();
        self.advance(Sample { id, logprob, top }, ctx, max_positions)
    }

    /// Appends the sampled token, updates every criterion and builds the generation.
    fn advance(
        &mut self,
        sample: Sample,
        ctx: &TextContext,
        max_positions: usize,
    ) -> Result<StepOutput, EngineError> {
        let tokenizer = &ctx.tokenizer;
        let Sample { id, logprob, top } = sample;
        self.tokens.push(id);
        let text = self
            .decoder
            .push(tokenizer, id)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut finish = self.stopping.check(id, &text);
        if finish.is_none() && self.tokens.len() >= max_positions {
            // The model cannot attend further than its positions: stop as if by length.
            finish = Some(FinishReason::Length);
        }
        let special = ctx.eos_token_ids.contains(&id) || ctx.is_special(id);
        let tokens = Tokens {
            ids: vec![id],
            logprobs: vec![logprob],
            texts: vec![text],
            is_special: vec![special],
        };
        let top_tokens = if self.top_n > 0 {
            vec![Tokens {
                ids: top.iter().map(|(t, _)| *t).collect(),
                logprobs: top.iter().map(|(_, l)| *l).collect(),
                texts: top.iter().map(|(t, _)| ctx.token_text(*t)).collect(),
                is_special: top.iter().map(|(t, _)| ctx.is_special(*t)).collect(),
            }]
        } else {
            vec![]
        };
        let generated_text = match finish {
            Some(reason) => {
                let text = tokenizer
                    .decode(self.decoder.generated_ids(), true)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                Some(GeneratedText {
                    text,
                    generated_tokens: self.generated() as u32,
                    finish_reason: reason,
                    seed: (!self.sampler.is_greedy()).then_some(self.seed),
                })
            }
            None => None,
        };
        Ok(StepOutput {
            generation: Generation {
                request_id: self.id,
                prefill_tokens: None,
                tokens,
                generated_text,
                top_tokens,
                cached_tokens: None,
            },
            finished: finish.is_some(),
        })
    }

    /// Tokens not yet in the KV cache.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// True when the next step feeds the last sampled token (a decode row), false while a
    /// prompt (or, after a preemption, the whole sequence) is still being computed.
    pub fn decoding(&self) -> bool {
        self.generated() > 0 && self.pending() == 1
    }

    /// Whether the prompt's logprobs are still wanted from rows at positions `start..`.
    pub fn wants_prompt_rows(&self, start: usize) -> bool {
        self.prefill_logprobs && start + 1 < self.prompt_len && self.generated() == 0
    }

    /// Takes the logprobs of the prompt tokens predicted by `rows` (one logits row per
    /// position from `start`); rows already taken (before a preemption) are skipped.
    pub fn take_prompt_rows(&mut self, rows: &[f32], vocab: usize, start: usize) {
        let n = rows.len() / vocab.max(1);
        let end = (start + n).min(self.prompt_len - 1);
        let from = self.prompt_logprobs.len().max(start + 1);
        if from > end || start + 1 > self.prompt_logprobs.len() {
            return;
        }
        let targets = &self.tokens[from..=end];
        let rows = &rows[(from - 1 - start) * vocab..];
        self.prompt_logprobs
            .extend(crate::generation::token_logprobs(rows, vocab, targets));
    }

    /// The prompt tokens with the logprob of each given its prefix (NaN for the first token,
    /// which has no context), as taken by [`Sequence::take_prompt_rows`].
    pub fn prompt_tokens(&self, ctx: &TextContext) -> Tokens {
        let prompt = &self.tokens[..self.prompt_len];
        let mut logprobs = self.prompt_logprobs.clone();
        logprobs.resize(prompt.len(), f32::NAN);
        Tokens {
            ids: prompt.to_vec(),
            logprobs,
            texts: prompt.iter().map(|t| ctx.token_text(*t)).collect(),
            is_special: prompt.iter().map(|t| ctx.is_special(*t)).collect(),
        }
    }
}
