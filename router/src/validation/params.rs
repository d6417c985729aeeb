//! Checks of the sampling and stopping parameters that do not need the prompt's tokens, and the
//! length rules that do (given the token count).

use crate::config::Limits;
use crate::error::ValidationError;
use crate::infer::{GenerateParameters, ValidParameters};

/// Parameters that passed the token-independent checks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckedParameters {
    /// Sampling parameters with every default resolved.
    pub parameters: ValidParameters,
    /// Requested `max_new_tokens`, already known to be in `1..=max_total_tokens`.
    pub max_new_tokens: Option<u32>,
    /// Requested truncation, already known to be in `1..=max_input_length`.
    pub truncate: Option<u32>,
    /// Stop sequences (count and content checked).
    pub stop_sequences: Vec<String>,
    /// Keep generating after EOS.
    pub ignore_eos_token: bool,
    /// Alternatives per generated token (0 = none).
    pub top_n_tokens: u32,
    /// Return the prompt tokens with logprobs.
    pub decoder_input_details: bool,
}

fn range_error(
    field: &'static str,
    requirement: impl Into<String>,
    given: impl ToString,
) -> ValidationError {
    ValidationError::Range {
        field,
        requirement: requirement.into(),
        given: given.to_string(),
    }
}

/// Checks an optional float against `ok` (non-finite values always fail).
fn check_f32(
    field: &'static str,
    value: Option<f32>,
    requirement: &str,
    ok: impl Fn(f32) -> bool,
) -> Result<Option<f32>, ValidationError> {
    match value {
        Some(v) if !v.is_finite() || !ok(v) => Err(range_error(field, requirement, v)),
        other => Ok(other),
    }
}

/// Checks an optional integer against `1..=max`.
fn check_positive(
    field: &'static str,
    value: Option<i64>,
    max: u32,
) -> Result<Option<u32>, ValidationError> {
    match value {
        None => Ok(None),
        Some(v) => u32::try_from(v)
            .ok()
            .filter(|&v| v > 0 && v <= max)
            .map(Some)
            .ok_or_else(|| range_error(field, format!("strictly positive and <= {max}"), v)),
    }
}

/// Features the request may ask for that this server does not provide.
fn check_unsupported(p: &GenerateParameters) -> Result<(), ValidationError> {
    if let Some(best_of) = p.best_of {
        if best_of <= 0 {
            return Err(range_error("best_of", "strictly positive", best_of));
        }
        if best_of > 1 {
            return Err(ValidationError::Unsupported {
                param: "best_of",
                message: format!(
                    "`best_of` > 1 is not supported by this server (given: {best_of}); send several requests with different seeds instead"
                ),
            });
        }
    }
    if p.watermark == Some(true) {
        return Err(ValidationError::Unsupported {
            param: "watermark",
            message: "`watermark` is not supported by this server; set it to false or omit it"
                .into(),
        });
    }
    if p.response_format.as_ref().is_some_and(|f| !f.is_null()) {
        return Err(ValidationError::Unsupported {
            param: "response_format",
            message:
                "`response_format` (constrained generation) is not supported by this server; omit it"
                    .into(),
        });
    }
    Ok(())
}

/// Checks everything that does not depend on the prompt's tokens and resolves the sampling
/// defaults.
///
/// Sampling follows LoRAX: `temperature == 0` means greedy (`do_sample = false`,
/// `temperature = 1`); otherwise the request samples when `do_sample` is set or any warper is
/// active (`temperature != 1`, `top_k`, `top_p < 1`, `typical_p < 1`). The seed is random when
/// absent so that every sampled request can be replayed.
pub(crate) fn check_parameters(
    p: &GenerateParameters,
    limits: &Limits,
) -> Result<CheckedParameters, ValidationError> {
    check_unsupported(p)?;
    let temperature = check_f32("temperature", p.temperature, ">= 0", |t| t >= 0.0)?;
    let repetition_penalty = check_f32(
        "repetition_penalty",
        p.repetition_penalty,
        "strictly positive",
        |r| r > 0.0,
    )?;
    let frequency_penalty = check_f32(
        "frequency_penalty",
        p.frequency_penalty,
        "in [-2, 2]",
        |f| (-2.0..=2.0).contains(&f),
    )?;
    let presence_penalty = check_f32("presence_penalty", p.presence_penalty, "in [-2, 2]", |f| {
        (-2.0..=2.0).contains(&f)
    })?;
    let top_p = check_f32("top_p", p.top_p, "in (0, 1]", |v| v > 0.0 && v <= 1.0)?;
    let typical_p = check_f32("typical_p", p.typical_p, "in (0, 1)", |v| {
        v > 0.0 && v < 1.0
    })?;
    let top_k = match p.top_k {
        None => None,
        Some(k) => Some(
            u32::try_from(k)
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| range_error("top_k", "strictly positive", k))?,
        ),
    };
    let max_new_tokens =
        check_positive("max_new_tokens", p.max_new_tokens, limits.max_total_tokens)?;
    let truncate = check_positive("truncate", p.truncate, limits.max_input_length)?;
    let top_n_tokens = check_positive(
        "return_k_alternatives",
        p.return_k_alternatives,
        limits.max_top_n_tokens,
    )?
    .unwrap_or(0);

    let stop_sequences = p.stop.clone().unwrap_or_default();
    if stop_sequences.len() > limits.max_stop_sequences {
        return Err(ValidationError::StopSequences {
            max: limits.max_stop_sequences,
            given: stop_sequences.len(),
        });
    }
    if stop_sequences.iter().any(String::is_empty) {
        return Err(ValidationError::EmptyStopSequence);
    }

    let greedy = temperature == Some(0.0);
    let temperature = if greedy {
        1.0
    } else {
        temperature.unwrap_or(1.0)
    };
    let top_k = top_k.unwrap_or(0);
    let top_p = top_p.unwrap_or(1.0);
    let typical_p = typical_p.unwrap_or(1.0);
    let has_warpers = temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0;
    let do_sample = !greedy && (p.do_sample.unwrap_or(false) || has_warpers);

    Ok(CheckedParameters {
        parameters: ValidParameters {
            temperature,
            top_k,
            top_p,
            typical_p,
            do_sample,
            seed: p.seed.unwrap_or_else(rand::random),
            repetition_penalty: repetition_penalty.unwrap_or(1.0),
            frequency_penalty: frequency_penalty.unwrap_or(0.0),
            presence_penalty: presence_penalty.unwrap_or(0.0),
        },
        max_new_tokens,
        truncate,
        stop_sequences,
        ignore_eos_token: p.ignore_eos_token.unwrap_or(false),
        top_n_tokens,
        decoder_input_details: p.decoder_input_details.unwrap_or(false),
    })
}

/// Keeps the last `truncate` tokens (all of them when `None`).
pub(crate) fn truncate_left(mut ids: Vec<u32>, truncate: Option<u32>) -> Vec<u32> {
    if let Some(keep) = truncate {
        let keep = keep as usize;
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
    }
    ids
}

/// Checks the prompt length and resolves `max_new_tokens`: the requested value, or
/// `min(default_max_new_tokens, max_total_tokens - input_length)` when absent.
pub(crate) fn resolve_lengths(
    input_length: u32,
    max_new_tokens: Option<u32>,
    limits: &Limits,
) -> Result<u32, ValidationError> {
    if input_length > limits.max_input_length {
        return Err(ValidationError::InputLength {
            max_input_length: limits.max_input_length,
            input_length,
        });
    }
    let room = limits.max_total_tokens.saturating_sub(input_length);
    let max_new = match max_new_tokens {
        Some(n) => n,
        None => limits.default_max_new_tokens.min(room),
    };
    if max_new == 0 || max_new > room {
        return Err(ValidationError::MaxTotalTokens {
            max_total_tokens: limits.max_total_tokens,
            input_length,
            max_new_tokens: max_new,
        });
    }
    Ok(max_new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::testing::test_limits;

    fn check(p: GenerateParameters) -> Result<CheckedParameters, ValidationError> {
        check_parameters(&p, &test_limits())
    }

    fn field_of(e: ValidationError) -> &'static str {
        match e {
            ValidationError::Range { field, .. } => field,
            other => panic!("expected a range error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_resolve() {
        let c = check(GenerateParameters::default()).unwrap();
        let v = &c.parameters;
        assert_eq!(
            (v.temperature, v.top_k, v.top_p, v.typical_p),
            (1.0, 0, 1.0, 1.0)
        );
        assert_eq!(
            (
                v.repetition_penalty,
                v.frequency_penalty,
                v.presence_penalty
            ),
            (1.0, 0.0, 0.0)
        );
        assert!(!v.do_sample);
        assert_eq!(
            (c.max_new_tokens, c.truncate, c.top_n_tokens),
            (None, None, 0)
        );
        // Two requests without a seed get different random seeds (a collision has probability 2^-64).
        let other = check(GenerateParameters::default()).unwrap();
        assert_ne!(v.seed, other.parameters.seed);
    }

    #[test]
    fn given_seed_is_kept_and_temperature_zero_is_greedy() {
        let c = check(GenerateParameters {
            seed: Some(42),
            temperature: Some(0.0),
            do_sample: Some(true),
            top_k: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.parameters.seed, 42);
        assert!(!c.parameters.do_sample);
        assert_eq!(c.parameters.temperature, 1.0);
    }

    #[test]
    fn warpers_turn_sampling_on() {
        for p in [
            GenerateParameters {
                temperature: Some(0.7),
                ..Default::default()
            },
            GenerateParameters {
                top_k: Some(5),
                ..Default::default()
            },
            GenerateParameters {
                top_p: Some(0.9),
                ..Default::default()
            },
            GenerateParameters {
                typical_p: Some(0.9),
                ..Default::default()
            },
            GenerateParameters {
                do_sample: Some(true),
                ..Default::default()
            },
        ] {
            assert!(check(p.clone()).unwrap().parameters.do_sample, "{p:?}");
        }
        let c = check(GenerateParameters {
            top_p: Some(1.0),
            ..Default::default()
        })
        .unwrap();
        assert!(!c.parameters.do_sample, "top_p = 1 is not a warper");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases: Vec<(GenerateParameters, &str)> = vec![
            (
                GenerateParameters {
                    temperature: Some(-0.1),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateParameters {
                    temperature: Some(f32::INFINITY),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateParameters {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateParameters {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerateParameters {
                    frequency_penalty: Some(2.5),
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                GenerateParameters {
                    presence_penalty: Some(-2.1),
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                GenerateParameters {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerateParameters {
                    top_p: Some(1.01),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerateParameters {
                    typical_p: Some(1.0),
                    ..Default::default()
                },
                "typical_p",
            ),
            (
                GenerateParameters {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                GenerateParameters {
                    top_k: Some(-3),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(-1),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(1 << 40),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerateParameters {
                    truncate: Some(0),
                    ..Default::default()
                },
                "truncate",
            ),
            (
                GenerateParameters {
                    truncate: Some(33),
                    ..Default::default()
                },
                "truncate",
            ),
            (
                GenerateParameters {
                    return_k_alternatives: Some(0),
                    ..Default::default()
                },
                "return_k_alternatives",
            ),
            (
                GenerateParameters {
                    return_k_alternatives: Some(6),
                    ..Default::default()
                },
                "return_k_alternatives",
            ),
            (
                GenerateParameters {
                    best_of: Some(0),
                    ..Default::default()
                },
                "best_of",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(field_of(check(p).unwrap_err()), field);
        }
    }

    #[test]
    fn boundary_values_pass() {
        let c = check(GenerateParameters {
            frequency_penalty: Some(-2.0),
            presence_penalty: Some(2.0),
            top_p: Some(1.0),
            truncate: Some(32),
            return_k_alternatives: Some(5),
            max_new_tokens: Some(64),
            best_of: Some(1),
            watermark: Some(false),
            response_format: Some(serde_json::Value::Null),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.truncate, c.top_n_tokens, c.max_new_tokens),
            (Some(32), 5, Some(64))
        );
    }

    #[test]
    fn unsupported_features_are_explained() {
        for (p, needle) in [
            (
                GenerateParameters {
                    best_of: Some(2),
                    ..Default::default()
                },
                "best_of",
            ),
            (
                GenerateParameters {
                    watermark: Some(true),
                    ..Default::default()
                },
                "watermark",
            ),
            (
                GenerateParameters {
                    response_format: Some(serde_json::json!({"type": "json_object"})),
                    ..Default::default()
                },
                "response_format",
            ),
        ] {
            match check(p).unwrap_err() {
                ValidationError::Unsupported { param, message } => {
                    assert_eq!(param, needle);
                    assert!(
                        message.contains(needle) && message.contains("not supported"),
                        "{message}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn stop_sequences_are_limited() {
        let stop = |n: usize| GenerateParameters {
            stop: Some((0..n).map(|i| format!("s{i}")).collect()),
            ..Default::default()
        };
        assert_eq!(check(stop(4)).unwrap().stop_sequences.len(), 4);
        assert_eq!(
            check(stop(5)).unwrap_err(),
            ValidationError::StopSequences { max: 4, given: 5 }
        );
        let empty = GenerateParameters {
            stop: Some(vec![String::new()]),
            ..Default::default()
        };
        assert_eq!(
            check(empty).unwrap_err(),
            ValidationError::EmptyStopSequence
        );
    }

    #[test]
    fn truncation_keeps_the_last_tokens() {
        assert_eq!(truncate_left(vec![1, 2, 3, 4], Some(2)), vec![3, 4]);
        assert_eq!(truncate_left(vec![1, 2], Some(5)), vec![1, 2]);
        assert_eq!(truncate_left(vec![1, 2], None), vec![1, 2]);
    }

    #[test]
    fn lengths_resolve_against_limits() {
        // test_limits: max_input_length 32, max_total_tokens 64, default_max_new_tokens 16.
        let l = test_limits();
        assert_eq!(resolve_lengths(10, None, &l).unwrap(), 16);
        assert_eq!(resolve_lengths(10, Some(54), &l).unwrap(), 54);
        assert_eq!(
            resolve_lengths(10, Some(55), &l).unwrap_err(),
            ValidationError::MaxTotalTokens {
                max_total_tokens: 64,
                input_length: 10,
                max_new_tokens: 55
            }
        );
        assert_eq!(
            resolve_lengths(33, None, &l).unwrap_err(),
            ValidationError::InputLength {
                max_input_length: 32,
                input_length: 33
            }
        );
        // The default never exceeds the room left.
        let tight = Limits {
            default_max_new_tokens: 100,
            ..l
        };
        assert_eq!(resolve_lengths(32, None, &tight).unwrap(), 32);
    }
}
