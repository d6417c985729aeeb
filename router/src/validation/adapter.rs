//! The adapter selector of a request → [`AdapterSpec`].
//!
//! Only the base model is served for now: a request naming an adapter or a merge is rejected
//! with a clear message. The adapters work replaces [`resolve_adapter`]'s non-base branches; the
//! fields are already parsed ([`crate::infer::MergedAdapters`]). `adapter_source` and `api_token`
//! are accepted and ignored.

use crate::error::ValidationError;
use crate::infer::{AdapterSpec, GenerateParameters};

/// LoRAX's pseudo adapter id for the base model.
pub const BASE_MODEL_ADAPTER_ID: &str = "__base_model__";

/// Resolves the adapter fields of a request.
pub(crate) fn resolve_adapter(p: &GenerateParameters) -> Result<AdapterSpec, ValidationError> {
    let single = p
        .adapter_id
        .as_deref()
        .filter(|id| !id.is_empty() && *id != BASE_MODEL_ADAPTER_ID);
    match (single, &p.merged_adapters) {
        (Some(_), Some(_)) => Err(ValidationError::ConflictingAdapters),
        (Some(id), None) => Err(ValidationError::Unsupported(format!(
            "adapter `{id}` was requested, but LoRA adapters are not available yet on this server; \
             omit `adapter_id` (or use \"{BASE_MODEL_ADAPTER_ID}\") to run the base model"
        ))),
        (None, Some(_)) => Err(ValidationError::Unsupported(
            "`merged_adapters` was requested, but LoRA adapters and adapter merging are not \
             available yet on this server; omit `merged_adapters` to run the base model"
                .into(),
        )),
        (None, None) => Ok(AdapterSpec::Base),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::MergedAdapters;

    fn with(adapter_id: Option<&str>, merged: bool) -> GenerateParameters {
        GenerateParameters {
            adapter_id: adapter_id.map(String::from),
            merged_adapters: merged.then(|| MergedAdapters {
                ids: Some(vec!["a".into(), "b".into()]),
                weights: Some(vec![1.0, 0.5]),
                ..Default::default()
            }),
            adapter_source: Some("hub".into()),
            api_token: Some("secret".into()),
            ..Default::default()
        }
    }

    #[test]
    fn base_model_spellings_resolve_to_base() {
        for id in [None, Some(""), Some(BASE_MODEL_ADAPTER_ID)] {
            assert_eq!(
                resolve_adapter(&with(id, false)).unwrap(),
                AdapterSpec::Base
            );
        }
    }

    #[test]
    fn adapters_are_rejected_with_a_clear_message() {
        let single = resolve_adapter(&with(Some("org/lora"), false)).unwrap_err();
        assert!(single.to_string().contains("`org/lora`"), "{single}");
        assert!(single.to_string().contains("not available yet"), "{single}");
        let merged = resolve_adapter(&with(None, true)).unwrap_err();
        assert!(merged.to_string().contains("`merged_adapters`"), "{merged}");
        assert!(merged.to_string().contains("not available yet"), "{merged}");
        // An empty adapter_id next to a merge is not a conflict (the lorax client sends null).
        assert!(matches!(
            resolve_adapter(&with(Some(""), true)).unwrap_err(),
            ValidationError::Unsupported(_)
        ));
        assert_eq!(
            resolve_adapter(&with(Some("x"), true)).unwrap_err(),
            ValidationError::ConflictingAdapters
        );
    }
}
