//! The architecture of the trained Llama ([`LlamaShape`]) and its Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::TrainError;

/// Hyper-parameters of a Llama-family decoder, with the field names of a Hugging Face
/// `LlamaConfig` (so `config.json` reads back into it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaShape {
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
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Longest position the model is meant for (written to `config.json`).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// `lm_head` reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_token_id: Option<u32>,
}

impl LlamaShape {
    /// A shape with `head_dim = hidden / heads`, theta 10000, eps 1e-5 and untied embeddings.
    pub fn new(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Width of the query projection output.
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projection outputs.
    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Checks that the dimensions are positive and consistent.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
        ]
        .contains(&0)
        {
            return bad(format!("every model dimension must be positive: {self:?}"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        let theta_ok = self.rope_theta.is_finite() && self.rope_theta > 0.0;
        if !theta_ok || self.rms_norm_eps.is_nan() || self.rms_norm_eps < 0.0 {
            return bad("rope_theta must be positive and rms_norm_eps non-negative".into());
        }
        for (name, id) in [("bos", self.bos_token_id), ("eos", self.eos_token_id)] {
            if id.is_some_and(|id| id as usize >= self.vocab_size) {
                return bad(format!("{name}_token_id {id:?} is outside the vocabulary"));
            }
        }
        Ok(())
    }

    /// Every weight as `(Hugging Face name, shape)`, in a fixed order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
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

    /// Number of trainable parameters (a tied embedding counted once).
    pub fn param_count(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The Hugging Face `config.json` (`LlamaForCausalLM`) for weights stored as `torch_dtype`
    /// (`float32`, `bfloat16` or `float16`).
    pub fn hf_config(&self, torch_dtype: &str) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": true,
        })
    }

    /// Reads the shape back from a `config.json` written by [`LlamaShape::hf_config`] (or any
    /// Llama config without RoPE scaling; `head_dim` defaults to `hidden / heads`).
    pub fn from_hf_config_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut v: Value = serde_json::from_str(&text)?;
        if v.get("rope_scaling").is_some_and(|s| !s.is_null()) {
            return Err(TrainError::Config(
                "rope_scaling is not supported by the training forward".into(),
            ));
        }
        if let Some(obj) = v.as_object_mut() {
            let heads = obj.get("num_attention_heads").and_then(Value::as_u64);
            let hidden = obj.get("hidden_size").and_then(Value::as_u64);
            if let (Some(h), Some(d)) = (hidden, heads.filter(|&n| n > 0)) {
                obj.entry("head_dim").or_insert(json!(h / d));
            }
            if let Some(n) = heads {
                obj.entry("num_key_value_heads").or_insert(json!(n));
            }
            obj.entry("max_position_embeddings").or_insert(json!(2048));
            obj.entry("rms_norm_eps").or_insert(json!(1e-6));
            obj.entry("rope_theta").or_insert(json!(10_000.0));
            obj.entry("tie_word_embeddings").or_insert(json!(false));
            // eos may be a list: keep its first element.
            if let Some(Value::Array(ids)) = obj.get("eos_token_id").cloned() {
                obj.insert(
                    "eos_token_id".into(),
                    ids.first().cloned().unwrap_or(Value::Null),
                );
            }
        }
        let shape: Self = serde_json::from_value(v)?;
        shape.validate()?;
        Ok(shape)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn config_round_trip_and_param_count() {
        let mut s = LlamaShape::new(64, 32, 80, 2, 4, 2);
        s.eos_token_id = Some(2);
        s.validate().unwrap();
        // embed + lm_head 2*64*32, per layer 2 norms + q,o (32x32) + k,v (16x32) + 3 x 80x32.
        let layer = 2 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 80 * 32;
        assert_eq!(s.param_count(), 2 * 64 * 32 + 2 * layer + 32);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, s.hf_config("float32").to_string()).unwrap();
        assert_eq!(LlamaShape::from_hf_config_file(&path).unwrap(), s);
        assert!(LlamaShape::new(64, 32, 80, 2, 4, 3).validate().is_err());
    }
}
