//! The other direction of [`super::config`]: a [`ModelConfig`] built in code
//! ([`ModelConfig::llama`]), the names and shapes of its weights, and the Hugging Face
//! `config.json` / `generation_config.json` that read back into it. The checkpoints Medley makes
//! itself (the test fixtures, the trained demo) describe their architecture with this one type.

use candle_core::DType;
use serde_json::{Map, Value, json};

use super::config::{ModelConfig, RopeScaling};

/// The dimensions that make a Llama architecture; [`ModelConfig::llama`] fills in the rest.
/// Each field is the [`ModelConfig`] field of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct LlamaDims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
}

impl ModelConfig {
    /// A Llama of `dims` with `head_dim = hidden / heads`, RoPE base 10000 without scaling,
    /// RMSNorm epsilon 1e-5, 2048 positions, untied embeddings, no special tokens and f32
    /// storage. Not validated: see [`ModelConfig::validate`].
    pub fn llama(dims: LlamaDims) -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: dims.vocab_size,
            hidden_size: dims.hidden_size,
            intermediate_size: dims.intermediate_size,
            num_hidden_layers: dims.num_hidden_layers,
            num_attention_heads: dims.num_attention_heads,
            num_key_value_heads: dims.num_key_value_heads,
            head_dim: dims
                .hidden_size
                .checked_div(dims.num_attention_heads)
                .unwrap_or(0),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            torch_dtype: DType::F32,
            sliding_window: None,
        }
    }

    /// Every weight of a checkpoint of this architecture as `(Hugging Face name, shape)`, in a
    /// fixed order (embedding, each layer's norms and projections, final norm, `lm_head` unless
    /// tied).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, q, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.q_size(),
            self.kv_size(),
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// Number of parameters (a tied embedding counted once).
    pub fn param_count(&self) -> usize {
        self.weight_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The Hugging Face `config.json` (`LlamaForCausalLM` or `MistralForCausalLM`):
    /// [`ModelConfig::from_json_str`] reads it back into an equal config.
    pub fn hf_config_json(&self) -> Value {
        let mistral = self.model_type == "mistral";
        let mut cfg = json!({
            "architectures": [if mistral { "MistralForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.as_ref().map(rope_scaling_json),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "torch_dtype": torch_dtype_name(self.torch_dtype),
            "use_cache": true,
        });
        if let Some(obj) = cfg.as_object_mut() {
            special_tokens(self, obj);
            if mistral {
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
        }
        cfg
    }

    /// The `generation_config.json` naming the config's special tokens.
    pub fn generation_config_json(&self) -> Value {
        let mut obj = Map::new();
        special_tokens(self, &mut obj);
        Value::Object(obj)
    }
}

/// `bos_token_id` and `eos_token_id` (one id, a list of several, or null) into `obj`.
fn special_tokens(cfg: &ModelConfig, obj: &mut Map<String, Value>) {
    obj.insert("bos_token_id".into(), json!(cfg.bos_token_id));
    let eos = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    obj.insert("eos_token_id".into(), eos);
}

/// The `torch_dtype` name of a storage dtype (float32 for anything but bf16/f16).
pub(crate) fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// The `rope_scaling` object transformers reads for `scaling`.
fn rope_scaling_json(scaling: &RopeScaling) -> Value {
    match scaling {
        RopeScaling::Linear { factor } => json!({ "rope_type": "linear", "factor": factor }),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> LlamaDims {
        LlamaDims {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 80,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
        }
    }

    fn round_trip(cfg: &ModelConfig) -> ModelConfig {
        ModelConfig::from_json_str(&cfg.hf_config_json().to_string()).unwrap()
    }

    #[test]
    fn config_json_reads_back_equal() {
        let plain = ModelConfig::llama(dims());
        plain.validate().unwrap();
        assert_eq!(round_trip(&plain), plain);

        let mut rich = ModelConfig::llama(dims());
        rich.head_dim = 16; // wider than hidden / heads
        rich.tie_word_embeddings = true;
        rich.bos_token_id = Some(1);
        rich.eos_token_ids = vec![2, 3];
        rich.torch_dtype = DType::BF16;
        rich.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        assert_eq!(round_trip(&rich), rich);
        rich.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
        rich.eos_token_ids = vec![2];
        assert_eq!(round_trip(&rich), rich);

        let mut mistral = ModelConfig::llama(dims());
        mistral.model_type = "mistral".into();
        for window in [Some(16), None] {
            mistral.sliding_window = window;
            assert_eq!(round_trip(&mistral), mistral);
        }
    }

    #[test]
    fn generation_config_names_the_special_tokens() {
        let mut cfg = ModelConfig::llama(dims());
        assert_eq!(
            cfg.generation_config_json(),
            json!({"bos_token_id": null, "eos_token_id": null})
        );
        cfg.bos_token_id = Some(1);
        cfg.eos_token_ids = vec![2];
        assert_eq!(
            cfg.generation_config_json(),
            json!({"bos_token_id": 1, "eos_token_id": 2})
        );
    }

    #[test]
    fn weights_and_param_count() {
        let cfg = ModelConfig::llama(dims());
        // embed + lm_head 2*64*32, per layer 2 norms + q,o (32x32) + k,v (16x32) + 3 x 80x32.
        let layer = 2 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 80 * 32;
        assert_eq!(cfg.param_count(), 2 * 64 * 32 + 2 * layer + 32);
        let names: Vec<String> = cfg.weight_shapes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(names.last().map(String::as_str), Some("lm_head.weight"));
        assert_eq!(names.len(), 1 + 2 * 9 + 2);
        let mut tied = cfg.clone();
        tied.tie_word_embeddings = true;
        assert_eq!(tied.param_count(), cfg.param_count() - 64 * 32);
        // A head dim beyond hidden / heads widens q and o.
        let mut wide = cfg;
        wide.head_dim = 16;
        let shapes = wide.weight_shapes();
        assert_eq!(shapes[2].1, vec![64, 32]);
        assert_eq!(shapes[5].1, vec![32, 64]);
    }
}
