//! The reverse direction: GGUF metadata from a Hugging Face `config.json` and byte-level BPE
//! `tokenizer.json`, with llama.cpp's key names (used to write GGUF test fixtures from the
//! repository's random models, and checked by the round trip through [`super::config_json`]
//! and [`super::tokenizer_json`]).

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::GgufError;

/// llama.cpp's `LLAMA_TOKEN_TYPE_NORMAL`.
const TOKEN_TYPE_NORMAL: i32 = 1;

/// `general.*` and `llama.*` metadata for a Llama `config.json`.
pub fn config_metadata(config: &Json) -> Result<Vec<(String, Value)>, GgufError> {
    let int = |key: &str| -> Result<u32, GgufError> {
        config
            .get(key)
            .and_then(Json::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| GgufError::MissingKey(format!("config.json {key}")))
    };
    let float = |key: &str, default: f64| -> f32 {
        config.get(key).and_then(Json::as_f64).unwrap_or(default) as f32
    };
    let heads = int("num_attention_heads")?;
    let hidden = int("hidden_size")?;
    let head_dim = config
        .get("head_dim")
        .and_then(Json::as_u64)
        .map_or(hidden / heads.max(1), |v| v as u32);
    Ok(vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.embedding_length".into(), Value::U32(hidden)),
        (
            "llama.feed_forward_length".into(),
            Value::U32(int("intermediate_size")?),
        ),
        (
            "llama.block_count".into(),
            Value::U32(int("num_hidden_layers")?),
        ),
        ("llama.attention.head_count".into(), Value::U32(heads)),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(int("num_key_value_heads").unwrap_or(heads)),
        ),
        ("llama.attention.key_length".into(), Value::U32(head_dim)),
        ("llama.attention.value_length".into(), Value::U32(head_dim)),
        ("llama.rope.dimension_count".into(), Value::U32(head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(float("rms_norm_eps", 1e-5)),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(float("rope_theta", 10_000.0)),
        ),
        (
            "llama.context_length".into(),
            Value::U32(int("max_position_embeddings")?),
        ),
        ("llama.vocab_size".into(), Value::U32(int("vocab_size")?)),
    ])
}

/// What [`tokenizer_metadata`] records besides the `tokenizer.json`.
#[derive(Debug, Clone, Copy)]
pub struct TokenizerExport {
    /// The BOS token id, if the model has one.
    pub bos: Option<u32>,
    /// The EOS token id, if the model has one.
    pub eos: Option<u32>,
    /// Whether a BOS token starts every encoding.
    pub add_bos: bool,
    /// The model's vocabulary size (rows of the embedding): the token list is padded to it with
    /// unused `[PAD<id>]` tokens, as llama.cpp's converter does (llama.cpp requires one token per
    /// embedding row; Medley's reader skips them).
    pub vocab_size: usize,
}

/// `tokenizer.ggml.*` metadata for a byte-level BPE `tokenizer.json`: tokens by id (padded to
/// the vocabulary size), merges, token types (added special tokens are control tokens) and the
/// BOS/EOS ids and flags, under the names llama.cpp reads (`gpt2` model, `gpt-2` pre-tokenizer).
pub fn tokenizer_metadata(
    tokenizer: &Json,
    export: TokenizerExport,
) -> Result<Vec<(String, Value)>, GgufError> {
    let TokenizerExport {
        bos,
        eos,
        add_bos,
        vocab_size,
    } = export;
    let bad = |reason: &str| GgufError::Tokenizer(format!("tokenizer.json: {reason}"));
    let model = tokenizer.get("model").ok_or_else(|| bad("no model"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad("not a BPE model"));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("no vocab"))?;
    let mut tokens = vec![None; vocab.len()];
    let mut place = |text: &str, id: u64| -> Result<(), GgufError> {
        let id = usize::try_from(id).map_err(|_| bad("token id out of range"))?;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(text.to_string());
        Ok(())
    };
    for (text, id) in vocab {
        place(text, id.as_u64().ok_or_else(|| bad("vocab id"))?)?;
    }
    let mut control = vec![];
    for added in tokenizer
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(text), Some(id)) = (
            added.get("content").and_then(Json::as_str),
            added.get("id").and_then(Json::as_u64),
        ) else {
            return Err(bad("added token without content or id"));
        };
        place(text, id)?;
        if added.get("special").and_then(Json::as_bool) == Some(true) {
            control.push(id as usize);
        }
    }
    let mut tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.ok_or_else(|| bad(&format!("no token with id {id}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let used = tokens.len();
    tokens.extend((used..vocab_size).map(|id| format!("[PAD{id}]")));
    let types = (0..tokens.len())
        .map(|id| {
            Value::I32(if id >= used {
                super::tokenizer::TOKEN_TYPE_UNUSED as i32
            } else if control.contains(&id) {
                super::tokenizer::TOKEN_TYPE_CONTROL as i32
            } else {
                TOKEN_TYPE_NORMAL
            })
        })
        .collect();
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("no merges"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) => match (
                pair.first().and_then(Json::as_str),
                pair.get(1).and_then(Json::as_str),
            ) {
                (Some(a), Some(b)) if pair.len() == 2 => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(bad("a merge is not a pair of strings")),
            },
            _ => Err(bad("a merge is neither a string nor a pair")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ];
    if let Some(id) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    Ok(out)
}
