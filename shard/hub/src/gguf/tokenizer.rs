//! `tokenizer.json` and `tokenizer_config.json` from the `tokenizer.*` metadata of a GGUF file.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`) are supported; others (`bert`, `rwkv`, `t5`...)
//! are refused with [`GgufError::Unsupported`]:
//!
//! * byte-level BPE (`gpt2`: SmolLM2, Llama 3, Qwen): the vocabulary and merges as stored, the
//!   pre-tokenizer that `tokenizer.ggml.pre` names (llama.cpp's names; unknown ones fall back to
//!   GPT-2's, as transformers' GGUF converter does for all), control tokens as special added
//!   tokens, user-defined ones as added tokens, and the BOS/EOS template of `add_bos_token` /
//!   `add_eos_token`;
//! * SentencePiece (`llama`: Llama 2, TinyLlama, Mistral, CodeLlama), built as transformers'
//!   `GGUFLlamaConverter` builds it, in the child module `spm` (merges generated from the
//!   vocabulary and `tokenizer.ggml.scores`, byte fallback, the `▁` normaliser).
//!
//! Malformed metadata (a missing or mistyped key, lists of different lengths, token ids outside
//! the vocabulary) is a [`GgufError`], never a panic.

use serde_json::{Value, json};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{GgufError, GgufMetadata};

mod spm;

/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`.
pub(super) const TOKEN_TYPE_CONTROL: u64 = 3;
/// llama.cpp's `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: u64 = 4;
/// llama.cpp's `LLAMA_TOKEN_TYPE_UNUSED`: padding up to the embedding's rows, not in the vocabulary.
pub(super) const TOKEN_TYPE_UNUSED: u64 = 5;

/// Llama 3's pre-tokenizer split (llama.cpp `llama-bpe`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.json` bytes of the file's tokenizer.
pub fn tokenizer_json(meta: &GgufMetadata) -> Result<Vec<u8>, GgufError> {
    let tokenizer = build(meta)?;
    tokenizer
        .to_string(false)
        .map(String::into_bytes)
        .map_err(|e| GgufError::Tokenizer(e.to_string()))
}

/// The `tokenizer_config.json` of the file: special tokens, BOS/EOS flags and the chat
/// template (`tokenizer.chat_template`), which the router's OpenAI routes render.
pub fn tokenizer_config_json(meta: &GgufMetadata) -> Result<Value, GgufError> {
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let token = |key: &str| -> Result<Option<String>, GgufError> {
        Ok(meta
            .opt_u64(key)?
            .and_then(|id| tokens.get(id as usize).cloned()))
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "add_bos_token": add_bos(meta)?,
        "add_eos_token": add_eos(meta)?,
    });
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
    ] {
        if let Some(t) = token(gguf)? {
            config[hf] = json!(t);
        }
    }
    if let Some(template) = meta.opt_string("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    if let Some(arch) = meta.opt_string("general.architecture")?
        && let Some(n) = meta.opt_u64(&format!("{arch}.context_length"))?
    {
        config["model_max_length"] = json!(n);
    }
    Ok(config)
}

/// llama.cpp adds BOS by default unless the file says otherwise.
fn add_bos(meta: &GgufMetadata) -> Result<bool, GgufError> {
    Ok(meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(true))
}

fn build(meta: &GgufMetadata) -> Result<Tokenizer, GgufError> {
    match meta.string("tokenizer.ggml.model")? {
        "gpt2" => build_byte_level(meta),
        "llama" => spm::build(meta),
        other => Err(GgufError::Unsupported(format!(
            "tokenizer model `{other}` (supported: byte-level BPE `gpt2` and SentencePiece `llama`)"
        ))),
    }
}

/// The token types (`tokenizer.ggml.token_type`), empty when the file has none.
fn token_types(meta: &GgufMetadata) -> Result<Vec<u64>, GgufError> {
    match meta.opt_array("tokenizer.ggml.token_type")? {
        Some(types) => types
            .iter()
            .map(|v| super::as_u64("tokenizer.ggml.token_type", v))
            .collect(),
        None => Ok(vec![]),
    }
}

/// `tokenizer.ggml.add_eos_token`, off unless the file says otherwise.
fn add_eos(meta: &GgufMetadata) -> Result<bool, GgufError> {
    Ok(meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false))
}

/// A byte-level BPE (`gpt2`) vocabulary.
fn build_byte_level(meta: &GgufMetadata) -> Result<Tokenizer, GgufError> {
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let types = token_types(meta)?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) != Some(&TOKEN_TYPE_UNUSED))
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = strings(meta, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(GgufError::BadValue {
                key: "tokenizer.ggml.merges".into(),
                reason: format!("merge `{m}` is not two symbols separated by a space"),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = meta.opt_string("tokenizer.ggml.pre")?.unwrap_or("gpt2");
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let mut special = vec![];
    let mut user = vec![];
    for (id, ty) in types.iter().enumerate() {
        let Some(text) = tokens.get(id) else { break };
        match *ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(text.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => {
                user.push(AddedToken::from(text.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        if let Some(text) = meta.opt_u64(key)?.and_then(|id| tokens.get(id as usize))
            && !special.iter().any(|t| &t.content == text)
        {
            special.push(AddedToken::from(text.clone(), true));
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| GgufError::Tokenizer(e.to_string()))?;

    let post = post_processor(meta, &tokens, add_bos(meta)?, add_eos(meta)?)?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, GgufError> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // SmolLM's tokenizer: every digit on its own, then GPT-2's split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        "default" | "gpt2" | "gpt-2" => byte_level.into(),
        other => {
            tracing::warn!(
                pre = other,
                "unknown GGUF pre-tokenizer: using GPT-2's split (as transformers does)"
            );
            byte_level.into()
        }
    })
}

fn post_processor(
    meta: &GgufMetadata,
    tokens: &[String],
    add_bos: bool,
    add_eos: bool,
) -> Result<PostProcessorWrapper, GgufError> {
    let token = |key: &str| -> Result<(String, u32), GgufError> {
        let id = meta.u64(key)?;
        let text = tokens.get(id as usize).ok_or_else(|| GgufError::BadValue {
            key: key.to_string(),
            reason: format!("token id {id} is outside the vocabulary"),
        })?;
        Ok((text.clone(), id as u32))
    };
    if !add_bos && !add_eos {
        return Ok(ByteLevelProcessor::new(false, false, true).into());
    }
    let mut specials = vec![];
    let (mut single, mut pair) = (vec![], vec![]);
    if add_bos {
        let (bos, id) = token("tokenizer.ggml.bos_token_id")?;
        single.push(bos.clone());
        pair.push(bos.clone());
        specials.push((bos, id));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if add_eos {
        let (eos, id) = token("tokenizer.ggml.eos_token_id")?;
        single.push(eos.clone());
        pair.push(eos.clone());
        specials.push((eos, id));
    }
    pair.push("$B:1".to_string());
    let err = |e: String| GgufError::Tokenizer(e);
    let template = TemplateProcessing::builder()
        .try_single(single)
        .map_err(err)?
        .try_pair(pair)
        .map_err(err)?
        .special_tokens(specials)
        .build()
        .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
    Ok(template.into())
}

fn strings(meta: &GgufMetadata, key: &str) -> Result<Vec<String>, GgufError> {
    let values = meta
        .opt_array(key)?
        .ok_or_else(|| GgufError::MissingKey(key.to_string()))?;
    values
        .iter()
        .map(|v| match v {
            candle_core::quantized::gguf_file::Value::String(s) => Ok(s.clone()),
            other => Err(GgufError::BadValue {
                key: key.to_string(),
                reason: format!("element of type {:?}, not a string", other.value_type()),
            }),
        })
        .collect()
}
