//! What the OpenAI `model` field names, and how it becomes the LoRAX adapter fields that
//! validation already understands (`medley-spec` stays the one place adapters and merges are
//! checked and built).
//!
//! Resolution order:
//! 1. missing, empty, `__base_model__` or the served model id: the base model (the request's
//!    own `adapter_id` / `merged_adapters`, if any, still apply);
//! 2. anything else goes on as `adapter_id`: validation expands the name of a named merge
//!    ([`crate::merges`]) into its merge, exactly as on the LoRAX routes and in gRPC; any other
//!    id is an adapter, from the default adapter source unless the request sets
//!    `adapter_source`. Whether it exists is only known when it loads: the shard's NOT_FOUND
//!    ([`InferError::AdapterNotFound`]) then becomes 404 `model_not_found`. A merge's digest
//!    label (`merge:<digest>`, [`crate::affinity`]) may come with the `merged_adapters` it
//!    labels, so a gateway can route an inline merge by `model`.

use super::error::OpenAiError;
use super::types::AdapterFields;
use crate::affinity;
use crate::error::{InferError, ValidationError};
use crate::validation::BASE_MODEL_ADAPTER_ID;

/// What a `model` names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelTarget {
    /// The served base model.
    Base,
    /// An adapter id, or the name of a named merge.
    Adapter(String),
}

/// Resolves `model` against the served model id.
pub fn resolve(model: Option<&str>, served_model_id: &str) -> ModelTarget {
    match model.map(str::trim) {
        None | Some("") => ModelTarget::Base,
        Some(m) if m == served_model_id || m == BASE_MODEL_ADAPTER_ID => ModelTarget::Base,
        Some(m) => ModelTarget::Adapter(m.to_string()),
    }
}

impl ModelTarget {
    /// The `model` a request named, for messages; `None` for the base model.
    fn name(&self) -> Option<&str> {
        match self {
            Self::Base => None,
            Self::Adapter(id) => Some(id),
        }
    }

    /// The request's adapter fields with this target applied. A `model` naming an adapter or a
    /// named merge cannot be combined with another `adapter_id` or `merged_adapters`.
    pub fn apply(&self, mut fields: AdapterFields) -> Result<AdapterFields, OpenAiError> {
        let has_id = fields
            .adapter_id
            .as_deref()
            .is_some_and(|id| !id.is_empty());
        let conflict = |what: &str| {
            OpenAiError::invalid(
                "model",
                format!(
                    "`model` names `{}`, so `{what}` cannot be set too; send `model` = the base model id to use `{what}`",
                    self.name().unwrap_or_default()
                ),
            )
        };
        match self {
            Self::Base => {}
            Self::Adapter(id) => {
                // A merge's digest label may travel with the merge it labels (for routing).
                if fields.merged_adapters.is_some() && affinity::parse_merge_label(id).is_none() {
                    return Err(conflict("merged_adapters"));
                }
                if has_id && fields.adapter_id.as_deref() != Some(id) {
                    return Err(conflict("adapter_id"));
                }
                fields.adapter_id = Some(id.clone());
            }
        }
        Ok(fields)
    }

    /// The OpenAI error of a failed generation: when `model` named an adapter or a merge, an
    /// adapter that does not exist (or cannot exist here: an invalid id, adapters disabled) means
    /// the model is unknown; every other error keeps the shared mapping.
    pub fn error(&self, e: InferError) -> OpenAiError {
        let unknown = matches!(
            e,
            InferError::AdapterNotFound(_)
                | InferError::Validation(
                    ValidationError::Adapter(_)
                        | ValidationError::AdaptersDisabled
                        | ValidationError::UnknownMergeDigest(_)
                )
        );
        match self.name() {
            Some(model) if unknown => OpenAiError::ModelNotFound {
                model: model.to_string(),
                detail: e.to_string(),
            },
            _ => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::MergedAdapters;

    #[test]
    fn base_names_and_adapters() {
        for m in [None, Some(""), Some("org/base"), Some("__base_model__")] {
            assert_eq!(resolve(m, "org/base"), ModelTarget::Base, "{m:?}");
        }
        assert_eq!(
            resolve(Some("org/lora"), "org/base"),
            ModelTarget::Adapter("org/lora".into())
        );
    }

    #[test]
    fn targets_fill_or_conflict_with_the_adapter_fields() {
        let lora = ModelTarget::Adapter("org/lora".into());
        let f = lora.apply(AdapterFields::default()).expect("no conflict");
        assert_eq!(f.adapter_id.as_deref(), Some("org/lora"));
        let same = AdapterFields {
            adapter_id: Some("org/lora".into()),
            adapter_source: Some("local".into()),
            ..Default::default()
        };
        let f = lora.apply(same).expect("the same id");
        assert_eq!(f.adapter_source.as_deref(), Some("local"));
        let other = AdapterFields {
            adapter_id: Some("org/other".into()),
            ..Default::default()
        };
        assert!(lora.apply(other.clone()).is_err());
        let merged = AdapterFields {
            merged_adapters: Some(MergedAdapters::default()),
            ..Default::default()
        };
        assert!(lora.apply(merged.clone()).is_err());
        // The base model leaves the LoRAX fields to validation.
        assert_eq!(ModelTarget::Base.apply(other.clone()).ok(), Some(other));
    }

    #[test]
    fn unknown_adapters_of_model_are_model_not_found() {
        let lora = ModelTarget::Adapter("org/lora".into());
        let not_found = InferError::AdapterNotFound("adapter `org/lora` not found".into());
        assert!(matches!(
            lora.error(not_found.clone()),
            OpenAiError::ModelNotFound { .. }
        ));
        assert!(matches!(
            lora.error(InferError::Validation(ValidationError::AdaptersDisabled)),
            OpenAiError::ModelNotFound { .. }
        ));
        assert!(matches!(
            lora.error(InferError::Overloaded),
            OpenAiError::Api(_)
        ));
        // An unknown `adapter_id` with the base `model` keeps the shared 404 (model_not_found).
        assert!(matches!(
            ModelTarget::Base.error(not_found),
            OpenAiError::Api(_)
        ));
    }
}
