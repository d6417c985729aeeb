//! The shared pipeline's validation errors in OpenAI's words: the OpenAI name of the parameter
//! at fault (`max_tokens`, not the LoRAX `max_new_tokens`) in the message and in `param`, and for
//! a prompt (plus completion) past what the model takes, OpenAI's message and its code
//! `context_length_exceeded`, on which clients trim the conversation and retry.

use crate::error::ValidationError;

/// OpenAI's `code` of a request past the model's context.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// Parameters whose LoRAX name is also the OpenAI one ([`super::plan`]).
const SAME_NAME: [&str; 5] = [
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "stop",
];

/// A validation error as an OpenAI 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The message.
    pub message: String,
    /// The request field at fault.
    pub param: Option<&'static str>,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
}

/// `e` in OpenAI's words; `None` keeps the shared message (no OpenAI parameter to name).
pub fn translate(e: &ValidationError) -> Option<Translated> {
    let context = |message: String| Translated {
        message,
        param: None,
        code: Some(CONTEXT_LENGTH_EXCEEDED),
    };
    let param = |param: &'static str, message: String| Translated {
        message,
        param: Some(param),
        code: None,
    };
    match e {
        ValidationError::MaxTotalTokens {
            max_total_tokens,
            input_length,
            max_new_tokens,
        } => Some(context(format!(
            "This model's maximum context length is {max_total_tokens} tokens. However, you \
             requested {} tokens ({input_length} in the prompt, {max_new_tokens} for the \
             completion). Please reduce the prompt or `max_tokens`.",
            u64::from(*input_length) + u64::from(*max_new_tokens)
        ))),
        ValidationError::InputLength {
            max_input_length,
            input_length,
        } => Some(context(format!(
            "This model's maximum prompt length is {max_input_length} tokens. However, your \
             prompt has {input_length} tokens. Please reduce the prompt."
        ))),
        ValidationError::Range {
            field: "max_new_tokens",
            requirement,
            given,
        } => Some(param(
            "max_tokens",
            format!("`max_tokens` must be {requirement}. Given: {given}"),
        )),
        ValidationError::Range { field, .. } => SAME_NAME
            .iter()
            .find(|name| *name == field)
            .map(|name| param(name, e.to_string())),
        ValidationError::StopSequences { .. } | ValidationError::EmptyStopSequence => {
            Some(param("stop", e.to_string()))
        }
        ValidationError::EmptyInput => Some(param("prompt", "`prompt` cannot be empty".into())),
        ValidationError::Unsupported {
            param: name @ ("response_format" | "best_of"),
            ..
        } => Some(param(name, e.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lorax_names_become_openai_ones() {
        let e = ValidationError::Range {
            field: "max_new_tokens",
            requirement: "strictly positive and <= 256".into(),
            given: "300".into(),
        };
        assert_eq!(
            translate(&e),
            Some(Translated {
                message: "`max_tokens` must be strictly positive and <= 256. Given: 300".into(),
                param: Some("max_tokens"),
                code: None,
            })
        );
        let e = ValidationError::Range {
            field: "temperature",
            requirement: ">= 0".into(),
            given: "-1".into(),
        };
        let t = translate(&e).expect("temperature");
        assert_eq!((t.param, t.message), (Some("temperature"), e.to_string()));
        assert_eq!(
            translate(&ValidationError::EmptyStopSequence).and_then(|t| t.param),
            Some("stop")
        );
        // No OpenAI parameter of that name: the shared message stays.
        let e = ValidationError::Range {
            field: "top_k",
            requirement: "strictly positive".into(),
            given: "0".into(),
        };
        assert_eq!(translate(&e), None);
        let unsupported = |param| ValidationError::Unsupported {
            param,
            message: "not supported".into(),
        };
        assert_eq!(translate(&unsupported("watermark")), None);
        let t = translate(&unsupported("response_format")).expect("an OpenAI parameter");
        assert_eq!(
            (t.param, t.message.as_str()),
            (Some("response_format"), "not supported")
        );
        let t = translate(&ValidationError::EmptyInput).expect("the prompt");
        assert_eq!(
            (t.param, t.message.as_str()),
            (Some("prompt"), "`prompt` cannot be empty")
        );
    }

    #[test]
    fn too_long_requests_are_context_length_exceeded() {
        let e = ValidationError::MaxTotalTokens {
            max_total_tokens: 256,
            input_length: 200,
            max_new_tokens: 100,
        };
        let t = translate(&e).expect("context");
        assert_eq!(t.code, Some(CONTEXT_LENGTH_EXCEEDED));
        assert_eq!(
            t.message,
            "This model's maximum context length is 256 tokens. However, you requested 300 \
             tokens (200 in the prompt, 100 for the completion). Please reduce the prompt or \
             `max_tokens`."
        );
        let e = ValidationError::InputLength {
            max_input_length: 255,
            input_length: 300,
        };
        let t = translate(&e).expect("context");
        assert_eq!(t.code, Some(CONTEXT_LENGTH_EXCEEDED));
        assert!(
            t.message.contains("maximum prompt length is 255 tokens"),
            "{}",
            t.message
        );
    }
}
