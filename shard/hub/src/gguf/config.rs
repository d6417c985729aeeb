//! `config.json` (Hugging Face `LlamaConfig`) from GGUF metadata, as transformers' GGUF loader
//! builds it: the `<arch>.*` keys give the shape, `output.weight`'s absence ties the embeddings.

use serde_json::{Value, json};

use super::{GgufError, GgufMetadata};

/// The Hugging Face `config.json` of a GGUF file (weights dequantized to f32).
pub fn config_json(meta: &GgufMetadata) -> Result<Value, GgufError> {
    let arch = meta.architecture()?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.u64(&key("embedding_length"))?;
    let heads = meta.u64(&key("attention.head_count"))?;
    if heads == 0 || hidden == 0 {
        return Err(GgufError::BadValue {
            key: key("attention.head_count"),
            reason: "zero heads or hidden size".into(),
        });
    }
    let kv_heads = meta
        .opt_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = meta
        .opt_u64(&key("attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(v) = meta.opt_u64(&key("attention.value_length"))?
        && v != head_dim
    {
        return Err(GgufError::Unsupported(format!(
            "value head size {v} differs from key head size {head_dim}"
        )));
    }
    if let Some(kind) = meta.opt_string(&key("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(GgufError::Unsupported(format!(
            "rope scaling `{kind}` in GGUF metadata"
        )));
    }
    if meta.has_tensor("rope_freqs.weight") {
        return Err(GgufError::Unsupported(
            "precomputed rope frequencies (`rope_freqs.weight`, Llama 3.1 style)".into(),
        ));
    }
    let vocab = match meta.opt_u64(&key("vocab_size"))? {
        Some(v) => v,
        None => match meta.opt_array("tokenizer.ggml.tokens")? {
            Some(tokens) => tokens.len() as u64,
            None => return Err(GgufError::MissingKey(key("vocab_size"))),
        },
    };
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        "rope_theta": meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        "max_position_embeddings": meta.opt_u64(&key("context_length"))?.unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": !meta.has_tensor("output.weight"),
        "torch_dtype": "float32",
    });
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = meta.opt_u64(gguf)? {
            config[hf] = json!(id);
        }
    }
    Ok(config)
}
