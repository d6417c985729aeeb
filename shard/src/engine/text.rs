//! Tokenizer facts the engine needs on every step, computed once.

use std::collections::HashSet;

use tokenizers::Tokenizer;

/// The tokenizer plus precomputed special-token facts.
pub struct TextContext {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Ids that end generation (unless a request ignores EOS).
    pub eos_token_ids: Vec<u32>,
    special: HashSet<u32>,
}

impl TextContext {
    /// Wraps `tokenizer`; `eos_token_ids` come from the model config.
    pub fn new(tokenizer: Tokenizer, eos_token_ids: Vec<u32>) -> Self {
        let special = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Self {
            tokenizer,
            eos_token_ids,
            special,
        }
    }

    /// True for special tokens (BOS, EOS, ...).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Text of one token on its own (empty when the tokenizer does not know the id).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}
