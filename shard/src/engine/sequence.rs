//! One running request on the shard: its tokens, sampler, stopping criteria and detokenizer.

use crate::generation::{FinishReason, IncrementalDecoder, Sample, Sampler, StoppingCriteria};

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
    sampler: Sampler,
    stopping: StoppingCriteria,
    decoder: IncrementalDecoder,
    seed: u64,
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
        vocab_size: usize,
        max_positions: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, EngineError> {
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

    /// Samples the next token from `logits`, updates every criterion and builds the generation.
    pub fn step(
        &mut self,
        logits: &[f32],
        ctx: &TextContext,
        max_positions: usize,
    ) -> Result<StepOutput, EngineError> {
        let tokenizer = &ctx.tokenizer;
        let Sample { id, logprob, top } = self.sampler.next(logits, &self.tokens, self.top_n);
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
            },
            finished: finish.is_some(),
        })
    }

    /// The prompt tokens with the logprob of each given its prefix (NaN for the first token,
    /// which has no context). `logits` holds one row per prompt token.
    pub fn prompt_tokens(&self, logits: &[f32], vocab: usize, ctx: &TextContext) -> Tokens {
        let prompt = &self.tokens[..self.prompt_len];
        let mut logprobs = Vec::with_capacity(prompt.len());
        logprobs.push(f32::NAN);
        if prompt.len() > 1 {
            let rows = &logits[..(prompt.len() - 1) * vocab];
            logprobs.extend(crate::generation::token_logprobs(rows, vocab, &prompt[1..]));
        }
        Tokens {
            ids: prompt.to_vec(),
            logprobs,
            texts: prompt.iter().map(|t| ctx.token_text(*t)).collect(),
            is_special: prompt.iter().map(|t| ctx.is_special(*t)).collect(),
        }
    }
}
