//! `adapter_config.json`: the LoRA fields Medley honours, and refusal of the features it does not
//! support.

use std::fmt;

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::PeftError;

/// PEFT's `target_modules`: a list of module names (matched exactly or as a `.`-suffix of the
/// module path) or one regular expression (matched against the whole path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names, e.g. `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// A regular expression, e.g. `".*\.(q|v)_proj"`.
    Regex(String),
}

/// A JSON object read in file order (PEFT scans `rank_pattern`/`alpha_pattern` keys in order and
/// takes the first match).
#[derive(Debug, Clone, PartialEq, Default)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

/// The raw JSON fields (PEFT's `LoraConfig` defaults apply to absent ones).
#[derive(Deserialize)]
struct Raw {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    rank_pattern: Option<Ordered<usize>>,
    alpha_pattern: Option<Ordered<f64>>,
    base_model_name_or_path: Option<String>,
    modules_to_save: Option<Value>,
    use_dora: Option<bool>,
    layers_to_transform: Option<Value>,
    layers_pattern: Option<Value>,
    bias: Option<String>,
    lora_bias: Option<bool>,
    target_parameters: Option<Value>,
    layer_replication: Option<Value>,
    trainable_token_indices: Option<Value>,
}

/// A parsed LoRA `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Default rank `r`.
    pub r: usize,
    /// Default `lora_alpha`.
    pub lora_alpha: f64,
    /// Targeted modules.
    pub target_modules: Option<TargetModules>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Conv1D-style weights (does not change the factor layouts `A [r, in]`, `B [out, r]`).
    pub fan_in_fan_out: bool,
    /// Base model the adapter was trained on.
    pub base_model_name_or_path: Option<String>,
    rank_pattern: Vec<(String, Regex, usize)>,
    alpha_pattern: Vec<(String, Regex, f64)>,
}

fn is_set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn unsupported(feature: &str, detail: &str) -> PeftError {
    PeftError::Unsupported {
        feature: feature.to_string(),
        detail: detail.to_string(),
    }
}

/// PEFT's `get_pattern_key` regex: `(.*\.)?(key)$` matched at the start of the module path.
fn pattern_regex(key: &str) -> Result<Regex, PeftError> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| PeftError::Pattern {
        key: key.to_string(),
        message: e.to_string(),
    })
}

impl AdapterConfig {
    /// Parses and validates `adapter_config.json` text.
    pub fn from_json(text: &str) -> Result<Self, PeftError> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| PeftError::Config(format!("adapter_config.json: {e}")))?;
        if let Some(t) = raw
            .peft_type
            .as_deref()
            .filter(|t| !t.eq_ignore_ascii_case("LORA"))
        {
            return Err(unsupported(
                "peft_type",
                &format!("{t} (only LORA adapters are supported)"),
            ));
        }
        if raw.use_dora == Some(true) {
            return Err(unsupported("use_dora", "DoRA adapters (use_dora: true)"));
        }
        if is_set(&raw.modules_to_save) {
            return Err(unsupported(
                "modules_to_save",
                "adapters that save full copies of modules (modules_to_save)",
            ));
        }
        for (name, v) in [
            ("layers_to_transform", &raw.layers_to_transform),
            ("layers_pattern", &raw.layers_pattern),
            ("target_parameters", &raw.target_parameters),
            ("layer_replication", &raw.layer_replication),
            ("trainable_token_indices", &raw.trainable_token_indices),
        ] {
            if is_set(v) {
                return Err(unsupported(name, &format!("adapters that set {name}")));
            }
        }
        if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported("bias", &format!("trained biases (bias: {b})")));
        }
        if raw.lora_bias == Some(true) {
            return Err(unsupported("lora_bias", "LoRA biases (lora_bias: true)"));
        }
        let r = raw.r.unwrap_or(8);
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        if r == 0 || !lora_alpha.is_finite() {
            return Err(PeftError::Config(format!(
                "invalid r {r} / lora_alpha {lora_alpha}"
            )));
        }
        let rank_pattern = raw
            .rank_pattern
            .unwrap_or_default()
            .0
            .into_iter()
            .map(|(k, v)| {
                if v == 0 {
                    return Err(PeftError::Config(format!("rank_pattern {k}: rank 0")));
                }
                Ok((k.clone(), pattern_regex(&k)?, v))
            })
            .collect::<Result<_, _>>()?;
        let alpha_pattern = raw
            .alpha_pattern
            .unwrap_or_default()
            .0
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), pattern_regex(&k)?, v)))
            .collect::<Result<_, PeftError>>()?;
        Ok(Self {
            r,
            lora_alpha,
            target_modules: raw.target_modules,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            base_model_name_or_path: raw.base_model_name_or_path,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// The rank of a module (first matching `rank_pattern` key, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |p| p.2)
    }

    /// The alpha of a module (first matching `alpha_pattern` key, else `lora_alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |p| p.2)
    }

    /// PEFT's scaling of a module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        scaling(
            self.alpha_for(module),
            self.rank_for(module),
            self.use_rslora,
        )
    }

    /// The config-level scale (`lora_alpha` and `r`, ignoring patterns): what LoRAX applies.
    pub fn config_scale(&self) -> f64 {
        scaling(self.lora_alpha, self.r, self.use_rslora)
    }

    /// Whether PEFT would target the module path (`target_modules` semantics of
    /// `check_target_module_exists`); `true` when `target_modules` is absent or its regex is not
    /// understood by the Rust regex engine.
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            None => true,
            Some(TargetModules::List(names)) => names.iter().any(|t| {
                module == t
                    || (module.ends_with(t.as_str())
                        && module[..module.len() - t.len()].ends_with('.'))
            }),
            Some(TargetModules::Regex(re)) => {
                Regex::new(&format!("^(?:{re})$")).map_or(true, |r| r.is_match(module))
            }
        }
    }

    /// The `rank_pattern` keys and values, in file order.
    pub fn rank_pattern(&self) -> Vec<(String, usize)> {
        self.rank_pattern
            .iter()
            .map(|(k, _, v)| (k.clone(), *v))
            .collect()
    }

    /// The `alpha_pattern` keys and values, in file order.
    pub fn alpha_pattern(&self) -> Vec<(String, f64)> {
        self.alpha_pattern
            .iter()
            .map(|(k, _, v)| (k.clone(), *v))
            .collect()
    }
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (PEFT computes this in Python floats).
pub fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The `adapter_config.json` Medley writes for a merged adapter: scale 1 everywhere
/// (`lora_alpha = r`, per-module `alpha_pattern = rank_pattern` where ranks differ), no rsLoRA.
pub(crate) fn merged_config_json(
    r: usize,
    rank_pattern: &[(String, usize)],
    target_modules: &TargetModules,
    base_model: Option<&str>,
) -> Value {
    let ranks: serde_json::Map<String, Value> = rank_pattern
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "use_rslora": false,
        "target_modules": target_modules,
        "rank_pattern": ranks.clone(),
        "alpha_pattern": ranks,
        "fan_in_fan_out": false,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_peft_matching() {
        let cfg = AdapterConfig::from_json(
            r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                "rank_pattern": {"layers.1.self_attn.q_proj": 4, "q_proj": 2},
                "alpha_pattern": {"v_proj": 3}}"#,
        )
        .unwrap();
        assert_eq!(cfg.rank_for("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.v_proj"), 8);
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.v_proj"), 3.0);
        assert_eq!(cfg.scale_for("model.layers.0.self_attn.v_proj"), 3.0 / 8.0);
        assert_eq!(cfg.scale_for("model.layers.1.self_attn.q_proj"), 16.0 / 4.0);
        assert_eq!(cfg.config_scale(), 2.0);
        // `xq_proj` does not end with `.q_proj`.
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.xq_proj"), 8);
        assert!(cfg.targets("model.layers.0.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.xq_proj"));
    }

    #[test]
    fn rslora_and_defaults() {
        let cfg =
            AdapterConfig::from_json(r#"{"r": 16, "lora_alpha": 8, "use_rslora": true}"#).unwrap();
        assert_eq!(cfg.config_scale(), 2.0);
        let d = AdapterConfig::from_json("{}").unwrap();
        assert_eq!((d.r, d.lora_alpha), (8, 8.0));
        let re = AdapterConfig::from_json(r#"{"target_modules": ".*\\.(q|v)_proj"}"#).unwrap();
        assert!(re.targets("model.layers.0.self_attn.q_proj"));
        assert!(!re.targets("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn unsupported_features_are_refused() {
        for (json, feature) in [
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"modules_to_save": ["lm_head"]}"#, "modules_to_save"),
            (r#"{"layers_to_transform": [0, 1]}"#, "layers_to_transform"),
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"peft_type": "IA3"}"#, "peft_type"),
        ] {
            let err = AdapterConfig::from_json(json).unwrap_err();
            assert!(
                matches!(&err, PeftError::Unsupported { feature: f, .. } if f == feature),
                "{json}: {err}"
            );
        }
        // Explicit nulls / empty values are fine.
        assert!(
            AdapterConfig::from_json(
                r#"{"modules_to_save": null, "layers_to_transform": null, "use_dora": false, "bias": "none"}"#
            )
            .is_ok()
        );
        assert!(matches!(
            AdapterConfig::from_json(r#"{"rank_pattern": {"(": 2}}"#).unwrap_err(),
            PeftError::Pattern { .. }
        ));
    }
}
