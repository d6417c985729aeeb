//! SentencePiece (`tokenizer.ggml.model = llama`) GGUF tokenizers against transformers.
//!
//! `fixtures/spm/tiny-spm.gguf` holds a small SentencePiece BPE vocabulary (640 pieces, byte
//! fallback, control and user-defined symbols, padded to 648 with unused tokens) written as
//! llama.cpp's converter writes one; `fixtures/spm/spm_goldens.json` holds what transformers
//! 4.57.6 (tokenizers 0.22.2) makes of it, for the file and for variants of its metadata. Both
//! come from `scripts/goldens/gguf_spm_goldens.py`; no Python runs here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value};
use medley_hub::gguf::{GgufError, GgufMetadata, tokenizer_config_json, tokenizer_json};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/spm")
        .join(name)
}

fn goldens() -> Json {
    serde_json::from_slice(&std::fs::read(fixture("spm_goldens.json")).unwrap()).unwrap()
}

/// The fixture's parsed header and metadata (it has no tensors).
fn content() -> Content {
    let bytes = std::fs::read(fixture("tiny-spm.gguf")).unwrap();
    Content::read(&mut std::io::Cursor::new(bytes)).unwrap()
}

/// The fixture's metadata with `edit` applied.
fn edited(edit: impl FnOnce(&mut HashMap<String, Value>)) -> GgufMetadata {
    let mut content = content();
    edit(&mut content.metadata);
    GgufMetadata::from_content(content)
}

/// The metadata of a golden variant: the fixture with its overrides (`[type, value]`, `null`
/// to leave the key out).
fn variant(overrides: &Json) -> GgufMetadata {
    edited(|meta| {
        for (key, value) in overrides.as_object().unwrap() {
            match value {
                Json::Null => {
                    assert!(meta.remove(key).is_some(), "{key}");
                }
                Json::Array(v) if v[0] == "bool" => {
                    meta.insert(key.clone(), Value::Bool(v[1].as_bool().unwrap()));
                }
                other => panic!("override {key}: {other}"),
            }
        }
    })
}

fn tokenizer(meta: &GgufMetadata) -> Tokenizer {
    Tokenizer::from_bytes(tokenizer_json(meta).expect("tokenizer.json")).expect("load")
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn fixture_is_the_one_the_goldens_were_made_from() {
    let g = goldens();
    assert_eq!(g["versions"]["transformers"], "4.57.6");
    let bytes = std::fs::read(fixture("tiny-spm.gguf")).unwrap();
    assert!(bytes.len() < 200 * 1024);
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        g["gguf"]["sha256"].as_str().unwrap()
    );
}

/// Every variant: the same vocabulary size, special tokens and ids for every text, with and
/// without special tokens, and the same decoded strings, keeping and skipping special tokens.
#[test]
fn encodes_and_decodes_like_transformers() {
    let g = goldens();
    let variants = g["variants"].as_object().unwrap();
    assert!(variants.len() >= 5);
    let mut checked = 0;
    for (name, golden) in variants {
        let tok = tokenizer(&variant(&golden["overrides"]));
        assert_eq!(
            tok.get_vocab_size(true) as u64,
            golden["vocab_size"].as_u64().unwrap(),
            "{name}"
        );
        let mut added: Vec<(u32, String, bool)> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content, t.special))
            .collect();
        added.sort();
        let expected: Vec<(u32, String, bool)> = golden["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let id = t[0].as_u64().unwrap() as u32;
                (
                    id,
                    t[1].as_str().unwrap().to_string(),
                    t[2].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(added, expected, "{name}: added tokens");

        for case in golden["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            for (key, special) in [("with_special", true), ("without_special", false)] {
                let want = &case[key];
                let enc = tok.encode(text, special).expect("encode");
                assert_eq!(
                    enc.get_ids(),
                    ids(&want["ids"]),
                    "{name} {key} {text:?}: {:?}",
                    enc.get_tokens()
                );
                if let Some(pieces) = want.get("tokens") {
                    let pieces: Vec<&str> = pieces
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p.as_str().unwrap())
                        .collect();
                    assert_eq!(enc.get_tokens(), pieces, "{name} {key} {text:?}");
                }
                for (field, skip) in [("decoded", false), ("decoded_skip_special", true)] {
                    assert_eq!(
                        tok.decode(enc.get_ids(), skip).expect("decode"),
                        want[field].as_str().unwrap(),
                        "{name} {key} {field} {text:?}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 5 * 2 * 30, "{checked}");
}

/// The merges generated from the vocabulary and scores are transformers', in its order.
#[test]
fn merges_are_transformers_merges() {
    let g = goldens();
    let golden = &g["variants"]["base"]["merges"];
    let json: Json = serde_json::from_slice(&tokenizer_json(&edited(|_| {})).unwrap()).unwrap();
    let (merges, golden) = (
        json["model"]["merges"].as_array().unwrap(),
        golden.as_array().unwrap(),
    );
    assert!(golden.len() > 300);
    if let Some(i) = (0..golden.len()).find(|&i| merges.get(i) != golden.get(i)) {
        panic!(
            "merge {i}: {:?}, transformers has {}",
            merges.get(i),
            golden[i]
        );
    }
    assert_eq!(merges.len(), golden.len());
    assert_eq!(json["model"]["byte_fallback"], true);
    assert_eq!(json["model"]["unk_token"], "<unk>");
}

/// The real file through the launcher's path: read, then the model view's files.
#[test]
fn the_file_reads_into_a_model_view() {
    let meta = GgufMetadata::read(&fixture("tiny-spm.gguf")).expect("read");
    let files: HashMap<&str, Vec<u8>> = meta.view_files().expect("view").into_iter().collect();
    let tok = Tokenizer::from_bytes(&files["tokenizer.json"]).expect("load");
    assert_eq!(tok.get_vocab_size(true), 648);
    let config: Json = serde_json::from_slice(&files["tokenizer_config.json"]).unwrap();
    assert_eq!(config["bos_token"], "<s>");
    assert_eq!(config["eos_token"], "</s>");
    assert_eq!(config["unk_token"], "<unk>");
    assert_eq!(config["pad_token"], "<pad>");
    assert_eq!(config["add_bos_token"], true);
    assert_eq!(config["add_eos_token"], false);
    assert!(
        config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    let model: Json = serde_json::from_slice(&files["config.json"]).unwrap();
    assert_eq!(model["vocab_size"], 648);
    assert_eq!(tokenizer_config_json(&meta).unwrap(), config);
}

fn set(key: &str, value: Value) -> impl FnOnce(&mut HashMap<String, Value>) {
    let key = key.to_string();
    move |meta| {
        meta.insert(key, value);
    }
}

fn error(edit: impl FnOnce(&mut HashMap<String, Value>)) -> GgufError {
    tokenizer_json(&edited(edit)).expect_err("malformed metadata must be refused")
}

#[test]
fn unknown_models_are_unsupported() {
    for model in ["bert", "rwkv", "t5"] {
        let err = error(set("tokenizer.ggml.model", Value::String(model.into())));
        assert!(matches!(err, GgufError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains(&format!("`{model}`")), "{err}");
    }
}

#[test]
fn malformed_metadata_is_a_clear_error() {
    let scores = "tokenizer.ggml.scores";
    let n = match &content().metadata["tokenizer.ggml.tokens"] {
        Value::Array(v) => v.len(),
        _ => unreachable!(),
    };
    type Edit = Box<dyn FnOnce(&mut HashMap<String, Value>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "no scores",
            Box::new(|m| {
                m.remove(scores);
            }),
            "has no `tokenizer.ggml.scores`",
        ),
        (
            "too few scores",
            Box::new(set(scores, Value::Array(vec![Value::F32(0.0); n - 1]))),
            "647 scores for 648 tokens",
        ),
        (
            "scores of the wrong type",
            Box::new(set(scores, Value::Array(vec![Value::I32(0); n]))),
            "not a float",
        ),
        (
            "scores not an array",
            Box::new(set(scores, Value::F32(0.0))),
            "expected an array",
        ),
        (
            "a NaN score",
            Box::new(set(scores, {
                let mut v = vec![Value::F32(0.0); n];
                v[7] = Value::F32(f32::NAN);
                Value::Array(v)
            })),
            "score of token 7 is NaN",
        ),
        (
            "token types of the wrong length",
            Box::new(set(
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1); 3]),
            )),
            "3 token types for 648 tokens",
        ),
        (
            "a BOS id outside the vocabulary",
            Box::new(set("tokenizer.ggml.bos_token_id", Value::U32(648))),
            "token id 648 is outside the vocabulary of 648 tokens",
        ),
        (
            "a negative EOS id",
            Box::new(set("tokenizer.ggml.eos_token_id", Value::I32(-1))),
            "negative value -1",
        ),
        (
            "a pad id outside the vocabulary",
            Box::new(set("tokenizer.ggml.padding_token_id", Value::U64(u64::MAX))),
            "outside the vocabulary",
        ),
        (
            "an unknown-token id of the wrong type",
            Box::new(set(
                "tokenizer.ggml.unknown_token_id",
                Value::String("0".into()),
            )),
            "expected an integer",
        ),
        (
            "BOS on without a BOS id",
            Box::new(|m| {
                m.remove("tokenizer.ggml.bos_token_id");
            }),
            "has no `tokenizer.ggml.bos_token_id`",
        ),
        (
            "an empty vocabulary",
            Box::new(|m| {
                m.insert("tokenizer.ggml.tokens".into(), Value::Array(vec![]));
                m.insert(scores.into(), Value::Array(vec![]));
            }),
            "the vocabulary is empty",
        ),
        (
            "tokens that are not strings",
            Box::new(set(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::U8(1); n]),
            )),
            "not a string",
        ),
        (
            "no tokens",
            Box::new(|m| {
                m.remove("tokenizer.ggml.tokens");
            }),
            "has no `tokenizer.ggml.tokens`",
        ),
    ];
    for (what, edit, message) in cases {
        let err = error(edit);
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
}
