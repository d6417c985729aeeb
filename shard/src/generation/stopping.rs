//! When a sequence stops: end-of-sequence tokens, stop sequences in the generated text, and the
//! token budget.

use super::params::StopParams;

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The token budget (`max_new_tokens`, or the model's positions) is spent.
    Length,
    /// The model produced an end-of-sequence token.
    EosToken,
    /// The generated text contains a stop sequence.
    StopSequence,
}

/// Decides after each generated token whether the sequence is finished.
///
/// **Precedence** when several conditions hold on the same token: EOS token, then stop
/// sequence, then length. TGI and LoRAX check length first, so an EOS or a stop sequence
/// produced as the very last allowed token is reported there as `length`; we follow vLLM and
/// OpenAI instead, because `length` tells a client "truncated, ask for more", which is wrong
/// when the model did finish. The generated text is the same either way.
///
/// **Stop sequences** are matched against the text generated so far (not the prompt), so a
/// stop string can span several tokens. A match counts when it ends inside the text the
/// current token added — anywhere inside it, not only at its very end as in TGI's
/// `stop$` regex, which misses a stop string followed by more text in the same token. Only
/// the last `longest stop - 1` bytes of earlier text are kept, so memory and time per token
/// do not grow with the sequence. Empty stop strings are ignored (they would match at once).
#[derive(Debug, Clone)]
pub struct StoppingCriteria {
    params: StopParams,
    eos_token_ids: Vec<u32>,
    generated: u32,
    /// Tail of the generated text: at least the last `max_stop_len - 1` bytes.
    tail: String,
    max_stop_len: usize,
    matched: Option<usize>,
}

impl StoppingCriteria {
    /// Criteria for one sequence; `eos_token_ids` are the model's end-of-sequence ids
    /// (`generation_config.json` may list several).
    pub fn new(mut params: StopParams, eos_token_ids: Vec<u32>) -> Self {
        params.stop_sequences.retain(|s| !s.is_empty());
        let max_stop_len = params
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Self {
            params,
            eos_token_ids,
            generated: 0,
            tail: String::new(),
            max_stop_len,
            matched: None,
        }
    }

    /// Records one generated token, with `new_text` the text it completed (empty while a
    /// multi-byte character is incomplete), and returns why to stop, if the sequence is done.
    pub fn check(&mut self, token_id: u32, new_text: &str) -> Option<FinishReason> {
        self.generated = self.generated.saturating_add(1);
        if !self.params.ignore_eos_token && self.eos_token_ids.contains(&token_id) {
            return Some(FinishReason::EosToken);
        }
        if self.push_text(new_text) {
            return Some(FinishReason::StopSequence);
        }
        if self.generated >= self.params.max_new_tokens {
            return Some(FinishReason::Length);
        }
        None
    }

    /// Tokens seen so far.
    pub fn generated_tokens(&self) -> u32 {
        self.generated
    }

    /// The stop sequence that ended the sequence, if one did.
    pub fn matched_stop_sequence(&self) -> Option<&str> {
        self.matched
            .and_then(|i| self.params.stop_sequences.get(i))
            .map(String::as_str)
    }

    /// Appends `new_text` to the tail and reports whether a stop sequence now ends in it.
    fn push_text(&mut self, new_text: &str) -> bool {
        if self.max_stop_len == 0 || new_text.is_empty() {
            return false;
        }
        let before = self.tail.len();
        self.tail.push_str(new_text);
        for (i, stop) in self.params.stop_sequences.iter().enumerate() {
            // A match that ends in the new text starts at or after this byte.
            let start = floor_char_boundary(&self.tail, before.saturating_sub(stop.len() - 1));
            if self.tail[start..].contains(stop.as_str()) {
                self.matched = Some(i);
                return true;
            }
        }
        let keep_from = self.tail.len().saturating_sub(self.max_stop_len - 1);
        let cut = floor_char_boundary(&self.tail, keep_from);
        self.tail.drain(..cut);
        false
    }
}

/// The largest char boundary of `s` at or below `index` (`str::floor_char_boundary`, which is
/// newer than the workspace's minimum Rust version).
fn floor_char_boundary(s: &str, index: usize) -> usize {
    let mut i = index.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 2;

    fn criteria(max_new_tokens: u32, stops: &[&str], ignore_eos_token: bool) -> StoppingCriteria {
        let params = StopParams {
            max_new_tokens,
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
            ignore_eos_token,
        };
        StoppingCriteria::new(params, vec![EOS, 7])
    }

    #[test]
    fn length_after_max_new_tokens() {
        let mut c = criteria(3, &[], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(11, "b"), None);
        assert_eq!(c.check(12, "c"), Some(FinishReason::Length));
        assert_eq!(c.generated_tokens(), 3);
    }

    #[test]
    fn zero_budget_stops_on_first_token() {
        let mut c = criteria(0, &[], false);
        assert_eq!(c.check(10, "a"), Some(FinishReason::Length));
    }

    #[test]
    fn every_eos_id_stops_unless_ignored() {
        let mut c = criteria(10, &[], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(EOS, "</s>"), Some(FinishReason::EosToken));
        let mut c = criteria(10, &[], false);
        assert_eq!(c.check(7, ""), Some(FinishReason::EosToken));

        let mut c = criteria(3, &[], true);
        assert_eq!(c.check(EOS, "</s>"), None);
        assert_eq!(c.check(EOS, "</s>"), None);
        assert_eq!(c.check(EOS, "</s>"), Some(FinishReason::Length));
    }

    #[test]
    fn stop_sequence_spanning_tokens() {
        let mut c = criteria(100, &["STOP here"], false);
        for piece in ["Some text ", "ST", "O", "P h"] {
            assert_eq!(c.check(10, piece), None, "{piece}");
        }
        assert_eq!(
            c.check(11, "ere and more"),
            Some(FinishReason::StopSequence)
        );
        assert_eq!(c.matched_stop_sequence(), Some("STOP here"));
    }

    #[test]
    fn stop_sequence_inside_one_token_with_trailing_text() {
        let mut c = criteria(100, &["\n\n"], false);
        assert_eq!(c.check(10, "a\n"), None);
        assert_eq!(c.check(11, "\nb"), Some(FinishReason::StopSequence));

        let mut c = criteria(100, &["end"], false);
        assert_eq!(c.check(10, "the end."), Some(FinishReason::StopSequence));
    }

    #[test]
    fn stop_sequence_across_an_incomplete_character() {
        // "é" arrives only once its second byte is decoded: an empty text in between.
        let mut c = criteria(100, &["café!"], false);
        assert_eq!(c.check(10, "caf"), None);
        assert_eq!(c.check(11, ""), None);
        assert_eq!(c.check(12, "é"), None);
        assert_eq!(c.check(13, "!"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn long_text_keeps_only_a_tail_and_still_matches() {
        let mut c = criteria(10_000, &["xyz", "ünï"], false);
        for i in 0..=1000 {
            let piece = if i % 2 == 0 { "ü" } else { "abc" };
            assert_eq!(c.check(10, piece), None);
            assert!(c.tail.len() <= 3 + 4, "tail {}", c.tail.len());
        }
        assert_eq!(c.check(10, "n"), None);
        assert_eq!(c.check(10, "ïq"), Some(FinishReason::StopSequence));
        assert_eq!(c.matched_stop_sequence(), Some("ünï"));
    }

    #[test]
    fn empty_stop_sequences_are_ignored() {
        let mut c = criteria(2, &[""], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(10, "b"), Some(FinishReason::Length));
    }

    #[test]
    fn precedence_eos_then_stop_then_length() {
        // On the last allowed token, EOS wins over length.
        let mut c = criteria(2, &["</s>"], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(EOS, "</s>"), Some(FinishReason::EosToken));

        // A stop sequence completed by the last allowed token wins over length.
        let mut c = criteria(2, &["ab"], false);
        assert_eq!(c.check(10, "a"), None);
        assert_eq!(c.check(11, "b"), Some(FinishReason::StopSequence));

        // With EOS ignored, its text can still complete a stop sequence.
        let mut c = criteria(5, &["</s>"], true);
        assert_eq!(c.check(EOS, "</s>"), Some(FinishReason::StopSequence));
    }
}
