//! Token generation logic of one sequence, free of any model or device code:
//!
//! * [`Sampler`] — penalties, warpers and the greedy or seeded random choice of the next
//!   token, with its logprob and top-n alternatives; [`token_logprobs`] for prompt logprobs.
//! * [`StoppingCriteria`] — EOS tokens, stop sequences and the token budget.
//! * [`IncrementalDecoder`] — streaming detokenization that never splits a character.
//! * [`SamplingParams`], [`StopParams`] — the per-request parameters (the server converts
//!   them from the shard proto's `NextTokenChooserParameters` and `StoppingCriteriaParameters`).
//! * [`FinishReason`] — why a sequence finished, as [`StoppingCriteria`] decides it.
//!
//! The semantics follow TGI, LoRAX and `transformers`; each type documents where it differs
//! and why. The engine calls, per sequence and step: `Sampler::next` on the last position's
//! logits, `IncrementalDecoder::push` on the chosen id, then `StoppingCriteria::check` with the
//! id and the text it produced.

mod candidates;
mod detok;
mod logits;
mod params;
mod sampling;
mod stopping;

pub use detok::{DetokError, IncrementalDecoder};
pub use logits::token_logprobs;
pub use params::{SamplingError, SamplingParams, StopParams};
pub use sampling::{Sample, Sampler};
pub use stopping::{FinishReason, StoppingCriteria};
