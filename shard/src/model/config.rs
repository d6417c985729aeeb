//! Parsing and validation of a Hugging Face Llama-family `config.json`.
//!
//! Defaults follow transformers' `LlamaConfig` / `MistralConfig` for fields a checkpoint may omit.
//! Anything the forward pass does not implement (biases, other activations, other RoPE types) is
//! rejected here with [`ModelError::Unsupported`] so that loading fails before any weight is read.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// RoPE frequency scaling, as in transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `"linear"`: every inverse frequency divided by `factor` (positions / factor).
    Linear {
        /// Divisor of the frequencies.
        factor: f64,
    },
    /// `"llama3"`: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length of the model before scaling.
        original_max_position_embeddings: usize,
    },
}

/// The resolved architecture of a Llama-family checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama` or `mistral`.
    pub model_type: String,
    /// Rows of the embedding and of `lm_head`.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to the query heads; fewer means grouped-query attention).
    pub num_key_value_heads: usize,
    /// Size of one head (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Context length the model was trained for (positions beyond it are still computed).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// `lm_head` reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (`eos_token_id` may be an integer or a list).
    pub eos_token_ids: Vec<u32>,
    /// Storage dtype declared by the checkpoint (`torch_dtype` or `dtype`; float32 when absent).
    pub torch_dtype: DType,
    /// Mistral's sliding attention window: a query at position `p` attends to keys in
    /// `(p - window, p]`, as transformers' sliding-window mask does. The KV cache still keeps
    /// every token (no rotating buffer). `None` for Llama and for Mistral with `null`.
    pub sliding_window: Option<usize>,
}

/// The subset of `config.json` read with serde; the rest is resolved by hand.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

impl ModelConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))?;
        let raw: RawConfig = serde_json::from_value(value.clone())
            .map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))?;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        let mistral = match model_type.as_str() {
            "llama" => false,
            "mistral" => true,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "model_type `{other}` (only llama and mistral)"
                )));
            }
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(ModelError::Unsupported(format!("hidden_act `{act}`")));
        }
        if raw.attention_bias {
            return Err(ModelError::Unsupported("attention_bias = true".into()));
        }
        if raw.mlp_bias {
            return Err(ModelError::Unsupported("mlp_bias = true".into()));
        }
        let heads = raw.num_attention_heads;
        if heads == 0 {
            return Err(ModelError::InvalidConfig("num_attention_heads is 0".into()));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let cfg = Self {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(if mistral {
                4096 * 32
            } else {
                2048
            }),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling: parse_rope_scaling(value.get("rope_scaling"))?,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: parse_token_ids(value.get("bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: parse_token_ids(value.get("eos_token_id"), "eos_token_id")?,
            torch_dtype: parse_dtype(value.get("torch_dtype").or_else(|| value.get("dtype")))?,
            sliding_window: parse_sliding_window(value.get("sliding_window"), mistral)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of the query projection output (`num_attention_heads * head_dim`).
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projection outputs (`num_key_value_heads * head_dim`).
    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Checks that the dimensions are positive and consistent (done by every parse; a config
    /// built in code, e.g. by [`ModelConfig::llama`], calls it itself).
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidConfig(msg));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
        {
            return bad(
                "vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive"
                    .into(),
            );
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if !positive(self.rope_theta) || self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return bad("rope_theta must be positive and rms_norm_eps non-negative".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        Ok(())
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<RopeScaling>, ModelError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(other) => {
            return Err(ModelError::InvalidConfig(format!(
                "rope_scaling must be an object or null, got {other}"
            )));
        }
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::InvalidConfig("rope_scaling without rope_type".into()))?;
    let num = |key: &str| -> Result<f64, ModelError> {
        obj.get(key).and_then(Value::as_f64).ok_or_else(|| {
            ModelError::InvalidConfig(format!("rope_scaling `{kind}` needs a numeric `{key}`"))
        })
    };
    match kind {
        "default" => Ok(None),
        "linear" => {
            let factor = num("factor")?;
            if !positive(factor) {
                return Err(ModelError::InvalidConfig(
                    "rope_scaling factor must be > 0".into(),
                ));
            }
            Ok(Some(RopeScaling::Linear { factor }))
        }
        "llama3" => {
            let factor = num("factor")?;
            let low_freq_factor = num("low_freq_factor")?;
            let high_freq_factor = num("high_freq_factor")?;
            let original = num("original_max_position_embeddings")?;
            if !positive(factor)
                || !positive(high_freq_factor - low_freq_factor)
                || !positive(original)
            {
                return Err(ModelError::InvalidConfig(
                    "llama3 rope_scaling needs factor > 0, high_freq_factor > low_freq_factor and a positive original_max_position_embeddings".into(),
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original as usize,
            }))
        }
        other => Err(ModelError::Unsupported(format!(
            "rope_scaling type `{other}` (supported: default, linear, llama3)"
        ))),
    }
}

/// `x > 0` and not NaN.
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn parse_token_ids(v: Option<&Value>, field: &str) -> Result<Vec<u32>, ModelError> {
    let one = |v: &Value| -> Result<u32, ModelError> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| ModelError::InvalidConfig(format!("{field}: `{v}` is not a token id")))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

fn parse_dtype(v: Option<&Value>) -> Result<DType, ModelError> {
    match v.and_then(Value::as_str) {
        None | Some("float32") => Ok(DType::F32),
        Some("bfloat16") => Ok(DType::BF16),
        Some("float16") => Ok(DType::F16),
        Some(other) => Err(ModelError::Unsupported(format!("torch_dtype `{other}`"))),
    }
}

fn parse_sliding_window(v: Option<&Value>, mistral: bool) -> Result<Option<usize>, ModelError> {
    match v {
        // transformers' MistralConfig defaults to a 4096-token window when the key is absent.
        None => Ok(mistral.then_some(4096)),
        Some(Value::Null) => Ok(None),
        Some(v) if !mistral => {
            // Llama has no sliding window; a stray key is ignored like transformers does.
            tracing::debug!(value = %v, "ignoring sliding_window on a llama config");
            Ok(None)
        }
        Some(v) => v
            .as_u64()
            .map(|w| Some(w as usize))
            .ok_or_else(|| ModelError::InvalidConfig(format!("sliding_window `{v}`"))),
    }
}

/// Inverse RoPE frequencies for `head_dim`, computed in f32 exactly like transformers'
/// `_compute_default_rope_parameters` / `_compute_linear_scaling_rope_parameters` /
/// `_compute_llama3_parameters` (the attention factor of these types is 1).
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match &cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            let f = *factor as f32;
            inv.iter_mut().for_each(|x| *x /= f);
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old_len = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            for x in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *x;
                let scaled = if wavelen > low_freq_wavelen {
                    *x / factor
                } else {
                    *x
                };
                let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                *x = if medium {
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_json() -> Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        })
    }

    fn with(key: &str, v: Value) -> String {
        let mut j = base_json();
        j[key] = v;
        j.to_string()
    }

    #[test]
    fn defaults_follow_transformers() {
        let mut j = base_json();
        j.as_object_mut().unwrap().remove("num_key_value_heads");
        let c = ModelConfig::from_json_str(&j.to_string()).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.torch_dtype, DType::F32);
        assert!(!c.tie_word_embeddings);
        assert!(c.eos_token_ids.is_empty());
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn eos_int_or_list_and_dtype() {
        let c =
            ModelConfig::from_json_str(&with("eos_token_id", serde_json::json!([2, 7]))).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        let c = ModelConfig::from_json_str(&with("eos_token_id", serde_json::json!(5))).unwrap();
        assert_eq!(c.eos_token_ids, vec![5]);
        let c = ModelConfig::from_json_str(&with("dtype", serde_json::json!("bfloat16"))).unwrap();
        assert_eq!(c.torch_dtype, DType::BF16);
        assert!(ModelConfig::from_json_str(&with("eos_token_id", serde_json::json!("x"))).is_err());
    }

    #[test]
    fn mistral_sliding_window() {
        let c =
            ModelConfig::from_json_str(&with("model_type", serde_json::json!("mistral"))).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        let mut j = base_json();
        j["model_type"] = "mistral".into();
        j["sliding_window"] = Value::Null;
        assert_eq!(
            ModelConfig::from_json_str(&j.to_string())
                .unwrap()
                .sliding_window,
            None
        );
        j["sliding_window"] = 8.into();
        assert_eq!(
            ModelConfig::from_json_str(&j.to_string())
                .unwrap()
                .sliding_window,
            Some(8)
        );
    }

    #[test]
    fn unsupported_features_are_errors() {
        for (k, v) in [
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "dynamic", "factor": 4.0}),
            ),
            ("attention_bias", serde_json::json!(true)),
            ("mlp_bias", serde_json::json!(true)),
            ("hidden_act", serde_json::json!("gelu")),
            ("model_type", serde_json::json!("gpt2")),
        ] {
            let err = ModelConfig::from_json_str(&with(k, v)).unwrap_err();
            assert!(matches!(err, ModelError::Unsupported(_)), "{k}: {err}");
        }
        let err = ModelConfig::from_json_str(&with("num_key_value_heads", 3.into())).unwrap_err();
        assert!(matches!(err, ModelError::InvalidConfig(_)), "{err}");
        let err = ModelConfig::from_json_str(&with(
            "rope_scaling",
            serde_json::json!({"rope_type": "llama3"}),
        ))
        .unwrap_err();
        assert!(matches!(err, ModelError::InvalidConfig(_)), "{err}");
        assert!(ModelConfig::from_json_str("{not json").is_err());
    }

    /// Reference values printed by transformers 4.57.6 (`ROPE_INIT_FUNCTIONS`) for head_dim 16,
    /// theta 10000 and the fixture's llama3 block (factor 8, low 1, high 4, original 64); the
    /// linear case is the default frequencies / 4. Rust's and PyTorch's f32 `pow` may differ by
    /// an ulp or two (2.5e-7 relative); the llama3 blend adds a few more f32 ops (1e-6).
    #[test]
    fn rope_frequencies_match_transformers() {
        let mut j = base_json();
        j["hidden_size"] = 64.into();
        let mut cfg = ModelConfig::from_json_str(&j.to_string()).unwrap();
        let default = rope_inv_freq(&cfg);
        // Printed by transformers as float32 values widened to f64.
        let expect_default: [f64; 8] = [
            1.0,
            0.3162277638912201,
            0.10000000149011612,
            0.03162277862429619,
            0.009999999776482582,
            0.003162277862429619,
            0.0010000000474974513,
            0.0003162277862429619,
        ];
        cfg.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let llama3 = rope_inv_freq(&cfg);
        let expect_llama3: [f64; 8] = [
            1.0,
            0.24438458681106567,
            0.013042256236076355,
            0.0039528473280370235,
            0.0012499999720603228,
            0.00039528473280370235,
            0.0001250000059371814,
            3.9528473280370235e-05,
        ];
        cfg.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
        let linear = rope_inv_freq(&cfg);
        for i in 0..8 {
            assert!(
                (default[i] as f64 - expect_default[i]).abs() <= 2.5e-7 * expect_default[i],
                "{i}"
            );
            assert!(
                (llama3[i] as f64 - expect_llama3[i]).abs() <= 1e-6 * expect_llama3[i],
                "{i}: {}",
                llama3[i]
            );
            assert_eq!(linear[i], default[i] / 4.0);
        }
    }
}
