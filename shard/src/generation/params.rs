//! Per-request generation parameters and their range checks. The server converts them from
//! the internal proto messages (`crate::server`), mapping proto3's unset zeros to neutral values.

/// Errors raised by [`SamplingParams::validate`] (and so by [`super::Sampler::new`]).
///
/// The router validates every value first; these checks are the shard's defence against a
/// malformed internal request, so the messages name the offending field and value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// `temperature` must be finite and `>= 0` (0 means greedy).
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    /// `top_p` must lie in `(0, 1]` (1 disables it).
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    /// `typical_p` must lie in `(0, 1]` (1 disables it).
    #[error("typical_p must be in (0, 1], got {0}")]
    TypicalP(f32),
    /// `repetition_penalty` must be finite and `> 0` (1 disables it).
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    /// `frequency_penalty` must lie in `[-2, 2]` (OpenAI's range).
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    /// `presence_penalty` must lie in `[-2, 2]` (OpenAI's range).
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
}

/// How the next token of one sequence is chosen.
///
/// Neutral values switch a processor off: `temperature = 1`, `top_k = 0`, `top_p = 1`,
/// `typical_p = 1`, `repetition_penalty = 1`, `frequency_penalty = presence_penalty = 0`.
/// `temperature = 0` means greedy decoding whatever the other fields say (the limit of
/// sampling as the temperature goes to zero, and OpenAI's meaning of 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy, 1 = unchanged.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    pub top_p: f32,
    /// Typical sampling mass (1 = off).
    pub typical_p: f32,
    /// Sample even when no warper is active (otherwise greedy argmax).
    pub do_sample: bool,
    /// Seed of the sequence's ChaCha random stream.
    pub seed: u64,
    /// Hugging Face repetition penalty (1 = off).
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty (0 = off).
    pub frequency_penalty: f32,
    /// OpenAI presence penalty (0 = off).
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    /// Greedy decoding with every processor off.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Checks every field's range (see [`SamplingError`]).
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SamplingError::Temperature(t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(SamplingError::TypicalP(self.typical_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(SamplingError::RepetitionPenalty(r));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        Ok(())
    }

    /// True when the temperature, top-k, top-p or typical-p warper changes the scores.
    pub fn has_warpers(&self) -> bool {
        self.temperature != 1.0 || self.top_k != 0 || self.top_p < 1.0 || self.typical_p < 1.0
    }

    /// Whether the next token is drawn at random (TGI's `NextTokenChooser` rule: `do_sample`
    /// or any active warper) rather than taken as the argmax. `temperature = 0` forces greedy.
    pub fn is_sampling(&self) -> bool {
        self.temperature != 0.0 && (self.do_sample || self.has_warpers())
    }

    /// True when a penalty reads the token history.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// When a sequence stops, besides an EOS token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopParams {
    /// Stop after this many generated tokens (0 behaves like 1: the first token ends it).
    pub max_new_tokens: u32,
    /// Stop once the generated text contains any of these strings (empty strings are ignored).
    pub stop_sequences: Vec<String>,
    /// Keep generating after an EOS token.
    pub ignore_eos_token: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.validate().is_ok());
        assert!(!p.is_sampling());
        assert!(!p.has_penalties());
    }

    #[test]
    fn sampling_rule_follows_tgi() {
        let base = SamplingParams::default();
        let cases = [
            SamplingParams {
                do_sample: true,
                ..base
            },
            SamplingParams {
                temperature: 0.7,
                ..base
            },
            SamplingParams { top_k: 5, ..base },
            SamplingParams { top_p: 0.9, ..base },
            SamplingParams {
                typical_p: 0.9,
                ..base
            },
        ];
        for p in cases {
            assert!(p.is_sampling(), "{p:?}");
        }
        // Temperature 0 is greedy even with do_sample and warpers.
        let zero = SamplingParams {
            temperature: 0.0,
            do_sample: true,
            top_k: 3,
            ..base
        };
        assert!(!zero.is_sampling());
    }

    #[test]
    fn validation_rejects_out_of_range() {
        let base = SamplingParams::default();
        let bad = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..base
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..base }, "top_p"),
            (SamplingParams { top_p: 1.5, ..base }, "top_p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..base
                },
                "top_p",
            ),
            (
                SamplingParams {
                    typical_p: -1.0,
                    ..base
                },
                "typical_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.5,
                    ..base
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..base
                },
                "presence_penalty",
            ),
        ];
        for (p, field) in bad {
            let err = p.validate().expect_err(field).to_string();
            assert!(err.starts_with(field), "{err}");
        }
        let edge = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            typical_p: 1.0,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            ..base
        };
        assert!(edge.validate().is_ok());
    }
}
