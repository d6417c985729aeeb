//! SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama, Mistral,
//! CodeLlama) as transformers' `GGUFLlamaConverter` builds them (transformers 4.57,
//! `integrations/ggml.py`; the goldens of `scripts/goldens/gguf_spm_goldens.py` pin it):
//!
//! * a BPE model over every token of `tokenizer.ggml.tokens` (ids as stored, llama.cpp's unused
//!   `[PAD<id>]` padding included), with byte fallback (`<0x..>` tokens for what the
//!   vocabulary lacks), the unknown token (`unknown_token_id`) fused, and merges generated from
//!   the vocabulary and `tokenizer.ggml.scores` by [`merges`];
//! * the legacy Llama normaliser, `▁` prepended (unless `tokenizer.ggml.add_space_prefix` is
//!   false) and every space replaced by `▁`, and no pre-tokenizer;
//! * the decoder ByteFallback, Fuse, Replace `▁` by a space, Strip one leading space (only when
//!   a `▁` is prepended);
//! * control tokens (type 3) and the BOS, EOS and unknown tokens as special added tokens;
//!   user-defined tokens (type 4) stay plain vocabulary entries, as transformers leaves them
//!   (llama.cpp and SentencePiece itself match them whole: a known difference);
//! * the template of `add_bos_token` (default on) and `add_eos_token` (default off),
//!   `<s> $A </s>` and for pairs `<s> $A </s> <s> $B </s>`, as `LlamaTokenizerFast` makes it.
//!
//! Two things transformers 4.57 gets wrong are not copied: it ignores the file's
//! `add_bos_token` / `add_eos_token` (always BOS, never EOS) and takes the BOS token for the EOS
//! token. Medley follows the file, and the goldens are transformers' tokenizer with the file's
//! flags and EOS token set explicitly.

use std::cmp::Ordering;
use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::{GgufError, GgufMetadata, TOKEN_TYPE_CONTROL, add_bos, add_eos, strings, token_types};

const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TYPES: &str = "tokenizer.ggml.token_type";
/// SentencePiece's word-boundary mark, standing for a space.
const SPACE_MARK: &str = "\u{2581}";

/// A token the file names by id (`tokenizer.ggml.<name>_token_id`).
#[derive(Debug, Clone)]
struct Named {
    id: u32,
    text: String,
}

/// The SentencePiece tokenizer of `meta`.
pub(super) fn build(meta: &GgufMetadata) -> Result<Tokenizer, GgufError> {
    let tokens = strings(meta, TOKENS)?;
    if tokens.is_empty() {
        return Err(bad(TOKENS, "the vocabulary is empty".into()));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(bad(
            TOKENS,
            format!("{} tokens do not fit u32 ids", tokens.len()),
        ));
    }
    let scores = scores(meta, tokens.len())?;
    let types = token_types(meta)?;
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(bad(
            TYPES,
            format!("{} token types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let named = |name: &str| named(meta, name, &tokens);
    let (bos, eos, unk) = (named("bos")?, named("eos")?, named("unknown")?);
    // Only checked: a pad id outside the vocabulary is malformed metadata too.
    named("padding")?;

    // A token listed twice keeps its last id, as in transformers' (Python dict) vocabulary.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let mut model = BPE::builder()
        .vocab_and_merges(vocab, merges(&tokens, &scores))
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = &unk {
        model = model.unk_token(unk.text.clone());
    }
    let mut tokenizer = Tokenizer::new(model.build().map_err(tokenizer_error)?);

    let prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    tokenizer
        .with_normalizer(Some(normalizer(prefix)?))
        .map_err(tokenizer_error)?;
    tokenizer.with_decoder(Some(decoder(prefix)?));

    let mut special: Vec<String> = types
        .iter()
        .zip(&tokens)
        .filter(|(ty, _)| **ty == TOKEN_TYPE_CONTROL)
        .map(|(_, text)| text.clone())
        .collect();
    for token in [&unk, &bos, &eos].into_iter().flatten() {
        if !special.contains(&token.text) {
            special.push(token.text.clone());
        }
    }
    tokenizer
        .add_special_tokens(special.into_iter().map(|text| AddedToken::from(text, true)))
        .map_err(tokenizer_error)?;

    // A BOS / EOS flag without its token is an error (transformers refuses it as well).
    let required = |on: bool, token: Option<Named>, name: &str| match (on, token) {
        (false, _) => Ok(None),
        (true, Some(token)) => Ok(Some(token)),
        (true, None) => Err(GgufError::MissingKey(format!(
            "tokenizer.ggml.{name}_token_id"
        ))),
    };
    let post = template(
        required(add_bos(meta)?, bos, "bos")?,
        required(add_eos(meta)?, eos, "eos")?,
    )?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The legacy Llama normaliser: `▁` prepended (when `prefix`), spaces replaced by `▁`.
fn normalizer(prefix: bool) -> Result<NormalizerSequence, GgufError> {
    let mut steps = vec![];
    if prefix {
        steps.push(Prepend::new(SPACE_MARK.to_string()).into());
    }
    steps.push(
        Replace::new(" ", SPACE_MARK)
            .map_err(tokenizer_error)?
            .into(),
    );
    Ok(NormalizerSequence::new(steps))
}

/// Byte tokens to bytes, fused, `▁` back to spaces, and the prepended space stripped.
fn decoder(prefix: bool) -> Result<DecoderSequence, GgufError> {
    let mut steps = vec![
        ByteFallback::new().into(),
        Fuse::new().into(),
        Replace::new(SPACE_MARK, " ")
            .map_err(tokenizer_error)?
            .into(),
    ];
    if prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps))
}

/// The merges transformers generates for a vocabulary without any (`GGUFTokenizerSkeleton`):
/// for every distinct token, each split into two tokens (left to right, by characters), these
/// ordered by the scores of (left, right), highest first; then all of them, stably, by the score
/// of the token they make, highest first. A token listed twice counts once, where first listed,
/// with the score of its last listing (a Python dict's).
fn merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut distinct = Vec::with_capacity(tokens.len());
    for (token, &s) in tokens.iter().zip(scores) {
        if score.insert(token.as_str(), s).is_none() {
            distinct.push(token.as_str());
        }
    }
    let desc = |a: f64, b: f64| b.partial_cmp(&a).unwrap_or(Ordering::Equal);
    let mut merges = vec![];
    for token in distinct {
        let Some(&made) = score.get(token) else {
            continue;
        };
        let mut local: Vec<(&str, &str, f64, f64)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = token.split_at(at);
                Some((left, right, *score.get(left)?, *score.get(right)?))
            })
            .collect();
        local.sort_by(|a, b| desc(a.2, b.2).then_with(|| desc(a.3, b.3)));
        merges.extend(local.into_iter().map(|(l, r, _, _)| (l, r, made)));
    }
    merges.sort_by(|a, b| desc(a.2, b.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// `tokenizer.ggml.scores`: one finite-or-infinite (not NaN) float per token.
fn scores(meta: &GgufMetadata, n: usize) -> Result<Vec<f64>, GgufError> {
    let values = meta
        .opt_array(SCORES)?
        .ok_or_else(|| GgufError::MissingKey(SCORES.to_string()))?;
    if values.len() != n {
        return Err(bad(
            SCORES,
            format!("{} scores for {n} tokens", values.len()),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(id, v)| {
            let s = match v {
                Value::F32(s) => f64::from(*s),
                Value::F64(s) => *s,
                other => {
                    return Err(bad(
                        SCORES,
                        format!("element of type {:?}, not a float", other.value_type()),
                    ));
                }
            };
            if s.is_nan() {
                return Err(bad(SCORES, format!("the score of token {id} is NaN")));
            }
            Ok(s)
        })
        .collect()
}

/// The token `tokenizer.ggml.<name>_token_id` names, if the key is present.
fn named(meta: &GgufMetadata, name: &str, tokens: &[String]) -> Result<Option<Named>, GgufError> {
    let key = format!("tokenizer.ggml.{name}_token_id");
    let Some(id) = meta.opt_u64(&key)? else {
        return Ok(None);
    };
    let text = usize::try_from(id)
        .ok()
        .and_then(|i| tokens.get(i))
        .ok_or_else(|| {
            bad(
                &key,
                format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )
        })?;
    Ok(Some(Named {
        id: id as u32,
        text: text.clone(),
    }))
}

/// LlamaTokenizerFast's template: `[bos] $A [eos]`, pairs `[bos] $A [eos] [bos] $B [eos]`.
fn template(bos: Option<Named>, eos: Option<Named>) -> Result<TemplateProcessing, GgufError> {
    let sequence = |seq: &str, type_id: u32| -> Vec<String> {
        let mut part = vec![];
        part.extend(bos.iter().map(|t| format!("{}:{type_id}", t.text)));
        part.push(format!("${seq}:{type_id}"));
        part.extend(eos.iter().map(|t| format!("{}:{type_id}", t.text)));
        part
    };
    let single = sequence("A", 0);
    let pair = [single.clone(), sequence("B", 1)].concat();
    let specials: Vec<(String, u32)> = [&bos, &eos]
        .into_iter()
        .flatten()
        .map(|t| (t.text.clone(), t.id))
        .collect();
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(GgufError::Tokenizer)?
        .try_pair(pair)
        .map_err(GgufError::Tokenizer)?
        .special_tokens(specials)
        .build()
        .map_err(tokenizer_error)
}

fn bad(key: &str, reason: String) -> GgufError {
    GgufError::BadValue {
        key: key.to_string(),
        reason,
    }
}

fn tokenizer_error(e: impl std::fmt::Display) -> GgufError {
    GgufError::Tokenizer(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(tokens: &[&str]) -> Vec<String> {
        tokens.iter().map(|t| t.to_string()).collect()
    }

    fn pairs(merges: &[(String, String)]) -> Vec<String> {
        merges.iter().map(|(a, b)| format!("{a} {b}")).collect()
    }

    #[test]
    fn merges_follow_transformers_order() {
        // The list transformers 4.57's `GGUFTokenizerSkeleton` makes of this vocabulary (a
        // token listed twice, `ab`, keeps its first place and takes its last score).
        let tokens = owned(&[
            "<unk>", "a", "b", "c", "ab", "bc", "abc", "▁", "▁a", "▁ab", "ca", "cab", "ab",
        ]);
        let scores = [
            0.0, -1.0, -1.0, -1.0, -2.0, -2.0, -3.0, -1.0, -2.5, -4.0, -2.0, -3.0, -5.0,
        ];
        assert_eq!(
            pairs(&merges(&tokens, &scores)),
            [
                "b c", "c a", "▁ a", "a bc", "ab c", "c ab", "ca b", "▁ ab", "▁a b", "a b"
            ]
        );
    }

    #[test]
    fn equal_scores_keep_split_and_vocabulary_order() {
        // transformers 4.57 on the same vocabulary: stable sorts throughout.
        let tokens = owned(&["x", "a", "y", "xa", "ay", "xay", "q", "qq"]);
        let scores = [0.0, -1.0, -1.0, 0.0, -1.0, -2.0, -1.0, -2.0];
        assert_eq!(
            pairs(&merges(&tokens, &scores)),
            ["x a", "a y", "x ay", "xa y", "q q"]
        );
        // Equal left scores: the higher right score first.
        let tokens = owned(&["y", "a", "x", "xa", "ay", "xay"]);
        let scores = [0.0, -1.0, 0.0, 0.0, -1.0, -3.0];
        assert_eq!(
            pairs(&merges(&tokens, &scores)),
            ["x a", "a y", "xa y", "x ay"]
        );
        // Splits are between characters, not bytes.
        let tokens = owned(&["é", "▁", "▁é"]);
        assert_eq!(pairs(&merges(&tokens, &[0.0, 0.0, -1.0])), ["▁ é"]);
    }
}
