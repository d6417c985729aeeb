//! Streaming detokenization with TGI's `prefix_offset` / `read_offset` scheme.

use tokenizers::Tokenizer;

/// Prompt tokens kept as decoding context (TGI starts `prefix_offset` 5 tokens before the end
/// of the prompt).
const PROMPT_CONTEXT: usize = 5;

/// Errors raised while decoding generated tokens.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DetokError {
    /// The tokenizer refused the ids (for example an id outside its vocabulary).
    #[error("failed to decode token {token_id}: {message}")]
    Decode {
        /// The token being pushed.
        token_id: u32,
        /// The tokenizer's message.
        message: String,
    },
}

/// Turns generated tokens into text one token at a time.
///
/// Each [`push`](Self::push) decodes two short windows with `skip_special_tokens = false`:
/// `ids[prefix_offset..read_offset]` (text already emitted, kept as context) and
/// `ids[prefix_offset..]`. The text of the new token is the difference, so spaces that depend
/// on the previous token (SentencePiece's `▁`, byte-level merges) come out exactly as a full
/// decode writes them. While the new window ends in U+FFFD (a multi-byte character whose
/// remaining bytes are in tokens not generated yet), nothing is emitted and the offsets stay;
/// the character comes out whole with the token that completes it. Only the last few prompt
/// tokens are kept, as context for the first generated token.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Prompt context followed by every generated id.
    ids: Vec<u32>,
    /// Where the generated ids start in `ids`.
    first_generated: usize,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder positioned after `prompt_ids`, keeping their last few tokens as context.
    pub fn new(prompt_ids: &[u32]) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        Self {
            ids: context.to_vec(),
            first_generated: context.len(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Pushes the newly generated `token_id` and returns the text it completes: empty while it
    /// ends in an incomplete UTF-8 sequence, possibly several tokens' worth once it completes.
    pub fn push(&mut self, tokenizer: &Tokenizer, token_id: u32) -> Result<String, DetokError> {
        self.ids.push(token_id);
        let (prefix, full) = self.decode_windows(tokenizer, token_id)?;
        if full.len() > prefix.len() && !full.ends_with(char::REPLACEMENT_CHARACTER) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(suffix_after(full, &prefix))
        } else {
            Ok(String::new())
        }
    }

    /// Returns the text of the pushed tokens not yet emitted — an incomplete character at the
    /// end of a finished sequence, decoded with U+FFFD as a full decode would — and marks it
    /// emitted. Empty when every token's text is out.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let last = self.ids.last().copied().unwrap_or_default();
        let (prefix, full) = self.decode_windows(tokenizer, last)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(suffix_after(full, &prefix))
    }

    /// Every generated id pushed so far.
    pub fn generated_ids(&self) -> &[u32] {
        &self.ids[self.first_generated..]
    }

    /// Decodes `ids[prefix_offset..read_offset]` and `ids[prefix_offset..]`.
    fn decode_windows(
        &self,
        tokenizer: &Tokenizer,
        token_id: u32,
    ) -> Result<(String, String), DetokError> {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, false)
                .map_err(|e| DetokError::Decode {
                    token_id,
                    message: e.to_string(),
                })
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        Ok((prefix, full))
    }
}

/// `full` without its leading `prefix`. When the decoder did not reproduce `prefix` as a prefix
/// of `full` (cleanup rules of some decoders can do that), falls back to cutting at the
/// prefix's byte length, moved forward to a character boundary, as TGI does.
fn suffix_after(mut full: String, prefix: &str) -> String {
    let mut cut = prefix.len().min(full.len());
    if !full.starts_with(prefix) {
        tracing::debug!(prefix, full, "incremental decode: window prefix changed");
        while !full.is_char_boundary(cut) {
            cut += 1;
        }
    }
    full.split_off(cut)
}

#[cfg(test)]
#[path = "detok_tests.rs"]
mod tests;
