//! The names an adapter or a merge goes by for routing: what a client puts in the OpenAI `model`
//! field (or `adapter_id`) and what `/metrics` lists in `medley_lora_requests_info`, so that an
//! inference gateway's LoRA affinity sends a request to a replica that already holds its adapter
//! or, more valuable still, its computed merge.
//!
//! - A single adapter goes by its id.
//! - A merge goes by the name of the named merge with its canonical key ([`crate::merges`]; the
//!   first by name when several share it), else by `merge:<digest>` ([`merge_label`]): the
//!   first 12 hex digits of the canonical merge key, the same for every equivalent spec.
//!   Responses carry the name a request's adapter goes by in `x-affinity-model`.
//! - One name per adapter or merge: a gateway counts the names a replica lists against its
//!   `max_lora` to tell whether it has a free slot, so a second name would make it look full.
//! - A request may name a merge by its digest label: `model` (or `adapter_id`) =
//!   `merge:<digest>` together with the inline `merged_adapters` (validation checks that the
//!   digest is the merge's), or alone when a named merge has that digest.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::backend::adapters::AdapterView;
use crate::infer::{AdapterKey, AdapterSpec};
use crate::merges::NamedMerges;

/// Prefix of a merge's digest label.
pub const MERGE_LABEL_PREFIX: &str = "merge:";
/// Hex digits of a merge digest (the [`AdapterKey`] display).
const DIGEST_LEN: usize = 12;

/// `merge:<digest>` of a merge's canonical key.
pub fn merge_label(key: &AdapterKey) -> String {
    format!("{MERGE_LABEL_PREFIX}{key}")
}

/// The digest named by `id` when it is a merge digest label (`merge:` and 12 lowercase hex
/// digits).
pub fn parse_merge_label(id: &str) -> Option<&str> {
    let digest = id.trim().strip_prefix(MERGE_LABEL_PREFIX)?;
    let hex = digest
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (digest.len() == DIGEST_LEN && hex).then_some(digest)
}

/// The name a request's adapter goes by (`None` for the base model), as `/metrics` lists it:
/// an adapter's id; for a merge, the name of the named merge with its key (however the request
/// named it), else the named merge the request asked for, else its digest label.
pub fn request_label(
    requested_id: Option<&str>,
    spec: &AdapterSpec,
    merges: &NamedMerges,
) -> Option<String> {
    let requested = requested_id
        .map(str::trim)
        .filter(|id| !id.is_empty() && parse_merge_label(id).is_none());
    label(spec, || spec.key(), requested, merges)
}

/// The name a tracked adapter or merge is listed under: an adapter's id; a merge's named-merge
/// name, else its digest label (`None` for the base model).
pub fn view_label(view: &AdapterView, merges: &NamedMerges) -> Option<String> {
    label(&view.spec, || view.key, None, merges)
}

/// The one naming rule of [`request_label`] and [`view_label`]; `key` is only computed for a
/// merge.
fn label(
    spec: &AdapterSpec,
    key: impl FnOnce() -> AdapterKey,
    requested: Option<&str>,
    merges: &NamedMerges,
) -> Option<String> {
    match spec {
        AdapterSpec::Base => None,
        AdapterSpec::Single(r) => Some(r.id.clone()),
        AdapterSpec::Merged(_) => {
            let key = key();
            Some(match merges.by_digest(&key.to_string()) {
                Some(named) => named.definition.name,
                None => requested.map_or_else(|| merge_label(&key), str::to_string),
            })
        }
    }
}

/// Label of base-model requests in per-adapter metrics.
pub const BASE_LABEL: &str = "__base_model__";
/// Label of the adapters past the label budget in per-adapter metrics.
pub const OTHER_LABEL: &str = "__other__";

/// Bounds the label values of per-adapter metrics: the first `max` distinct names get their own
/// label; later ones share [`OTHER_LABEL`], so a client cycling through adapter ids cannot grow
/// `/metrics` without limit.
#[derive(Debug)]
pub struct LabelBudget {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelBudget {
    /// A budget of `max` distinct names (besides the base model and "other").
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label to count a request under.
    pub fn label(&self, name: Option<&str>) -> String {
        let Some(name) = name else {
            return BASE_LABEL.to_string();
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(name) {
            return name.to_string();
        }
        if seen.len() < self.max {
            seen.insert(name.to_string());
            return name.to_string();
        }
        OTHER_LABEL.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medley_spec::{AdapterPolicy, AdapterSelector, AdapterSource, MergedAdapters, Semantics};

    fn merged(ids: &[&str]) -> AdapterSpec {
        let merge = MergedAdapters {
            ids: Some(ids.iter().map(|s| s.to_string()).collect()),
            weights: Some(vec![1.0; ids.len()]),
            merge_strategy: Some("linear".into()),
            ..Default::default()
        };
        let policy = AdapterPolicy {
            max_merge_adapters: 4,
            adapter_roots: vec![],
            default_source: AdapterSource::Hub,
            merge_semantics: Semantics::Peft,
            served_model_id: "org/base".into(),
        };
        let selector = AdapterSelector {
            merged_adapters: Some(&merge),
            ..Default::default()
        };
        medley_spec::resolve_selector(selector, &policy).expect("valid merge")
    }

    #[test]
    fn digest_labels_parse_only_in_their_exact_shape() {
        let spec = merged(&["org/a", "org/b"]);
        let label = merge_label(&spec.key());
        assert_eq!(label.len(), MERGE_LABEL_PREFIX.len() + DIGEST_LEN);
        assert_eq!(parse_merge_label(&label), Some(&label[6..]));
        for bad in [
            "merge:",
            "merge:abc",
            "merge:ABCDEF012345",
            "merge:0123456789abc",
            "merge:0123456789ag",
            "0123456789ab",
            "org/merge:0123456789ab",
        ] {
            assert_eq!(parse_merge_label(bad), None, "{bad}");
        }
    }

    #[test]
    fn request_labels_follow_what_the_client_named() {
        let spec = merged(&["org/a", "org/b"]);
        let digest = merge_label(&spec.key());
        let none = NamedMerges::default();
        assert_eq!(request_label(None, &AdapterSpec::Base, &none), None);
        assert_eq!(
            request_label(Some("team/mix"), &spec, &none).as_deref(),
            Some("team/mix")
        );
        assert_eq!(request_label(None, &spec, &none), Some(digest.clone()));
        assert_eq!(
            request_label(Some(&digest), &spec, &none),
            Some(digest.clone())
        );
        assert_eq!(request_label(Some(" "), &spec, &none), Some(digest));
    }

    #[test]
    fn label_budget_keeps_the_first_names_and_folds_the_rest() {
        let budget = LabelBudget::new(2);
        assert_eq!(budget.label(None), BASE_LABEL);
        assert_eq!(budget.label(Some("a")), "a");
        assert_eq!(budget.label(Some("b")), "b");
        assert_eq!(budget.label(Some("c")), OTHER_LABEL);
        assert_eq!(budget.label(Some("a")), "a");
        assert_eq!(budget.label(None), BASE_LABEL);
    }
}
