use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-llama")
        .join(name)
}

fn read_json(name: &str) -> Json {
    serde_json::from_slice(&std::fs::read(fixture(name)).expect("fixture")).expect("json")
}

/// The tiny fixture model's metadata as a GGUF file would carry it.
fn tiny_metadata() -> Vec<(String, Value)> {
    let mut meta = config_metadata(&read_json("config.json")).expect("config");
    meta.extend(
        tokenizer_metadata(
            &read_json("tokenizer.json"),
            TokenizerExport {
                bos: Some(1),
                eos: Some(2),
                add_bos: true,
                vocab_size: read_json("config.json")["vocab_size"].as_u64().unwrap() as usize,
            },
        )
        .expect("tokenizer"),
    );
    meta.push((
        "tokenizer.chat_template".into(),
        Value::String("{{ messages }}".into()),
    ));
    meta
}

fn content(meta: Vec<(String, Value)>, tensors: &[&str]) -> GgufMetadata {
    let tensor_infos = tensors
        .iter()
        .map(|name| {
            let info = TensorInfo {
                ggml_dtype: GgmlDType::F32,
                shape: (1,).into(),
                offset: 0,
            };
            (name.to_string(), info)
        })
        .collect();
    GgufMetadata::from_content(Content {
        magic: VersionedMagic::GgufV3,
        metadata: meta.into_iter().collect::<HashMap<_, _>>(),
        tensor_infos,
        tensor_data_offset: 0,
    })
}

#[test]
fn config_round_trips_through_gguf_metadata() {
    let original = read_json("config.json");
    let meta = content(tiny_metadata(), &["output.weight"]);
    let config = config_json(&meta).expect("config");
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ] {
        assert_eq!(config[key], original[key], "{key}");
    }
    // GGUF stores them as f32, and transformers reads that f32 value too.
    for key in ["rms_norm_eps", "rope_theta"] {
        let (a, b) = (config[key].as_f64(), original[key].as_f64());
        assert_eq!(a.unwrap(), f64::from(b.unwrap() as f32), "{key}");
    }
    // Without `output.weight` the embeddings are tied.
    let tied = config_json(&content(tiny_metadata(), &[])).expect("config");
    assert_eq!(tied["tie_word_embeddings"], true);
}

#[test]
fn tokenizer_round_trips_through_gguf_metadata() {
    let original = tokenizers::Tokenizer::from_file(fixture("tokenizer.json")).expect("tok");
    let raw = tiny_metadata();
    // One token per embedding row, as llama.cpp requires: the list is padded with unused tokens,
    // which the reader leaves out of the vocabulary.
    let tokens = raw
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .map(|(_, v)| v.to_vec().expect("array").len())
        .expect("tokens");
    let vocab_size = read_json("config.json")["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(tokens, vocab_size);
    assert!(
        original.get_vocab_size(true) < vocab_size,
        "the fixture pads"
    );
    let meta = content(raw, &[]);
    let converted =
        tokenizers::Tokenizer::from_bytes(tokenizer_json(&meta).expect("json")).expect("load");
    for text in [
        "Hello world, the quick brown fox.",
        "  leading spaces and\nnew lines\t tabs",
        "digits 12345 and punctuation!?",
        "</s> inside text <s>",
        "ünïcödé ✓",
    ] {
        let a = original.encode(text, true).expect("encode");
        let b = converted.encode(text, true).expect("encode");
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        assert_eq!(
            converted.get_vocab_size(true),
            original.get_vocab_size(true)
        );
        assert_eq!(
            original.decode(a.get_ids(), true).expect("decode"),
            converted.decode(b.get_ids(), true).expect("decode"),
            "{text:?}"
        );
    }
    let config = tokenizer_config_json(&meta).expect("config");
    assert_eq!(config["bos_token"], "<s>");
    assert_eq!(config["eos_token"], "</s>");
    assert_eq!(config["add_bos_token"], true);
    assert_eq!(config["chat_template"], "{{ messages }}");
}

#[test]
fn add_bos_false_adds_nothing() {
    let mut meta = tiny_metadata();
    for (k, v) in &mut meta {
        if k == "tokenizer.ggml.add_bos_token" {
            *v = Value::Bool(false);
        }
    }
    let tok = tokenizers::Tokenizer::from_bytes(tokenizer_json(&content(meta, &[])).unwrap())
        .expect("load");
    let ids = tok.encode("Hello", true).expect("encode");
    assert_ne!(ids.get_ids().first(), Some(&1));
}

#[test]
fn smollm_pre_tokenizer_splits_every_digit() {
    let mut meta = tiny_metadata();
    for (k, v) in &mut meta {
        if k == "tokenizer.ggml.pre" {
            *v = Value::String("smollm".into());
        }
    }
    let tok = tokenizers::Tokenizer::from_bytes(tokenizer_json(&content(meta, &[])).unwrap())
        .expect("load");
    let enc = tok.encode("in 2024", false).expect("encode");
    let tokens = enc.get_tokens();
    for d in ["2", "0", "4"] {
        assert!(tokens.iter().any(|t| t == d), "{tokens:?}");
    }
    assert!(tokens.iter().all(|t| !t.contains("20")), "{tokens:?}");
}

#[test]
fn unsupported_models_are_refused_by_name() {
    let mut meta = tiny_metadata();
    for (k, v) in &mut meta {
        if k == "tokenizer.ggml.model" {
            *v = Value::String("bert".into());
        }
    }
    let err = tokenizer_json(&content(meta, &[])).expect_err("bert");
    assert!(err.to_string().contains("`bert`"), "{err}");

    let mut meta = tiny_metadata();
    meta.retain(|(k, _)| k != "general.architecture");
    meta.push(("general.architecture".into(), Value::String("bert".into())));
    let err = config_json(&content(meta, &[])).expect_err("bert");
    assert!(err.to_string().contains("architecture `bert`"), "{err}");

    let mut meta = tiny_metadata();
    meta.retain(|(k, _)| k != "llama.block_count");
    let err = config_json(&content(meta, &[])).expect_err("missing");
    assert!(err.to_string().contains("llama.block_count"), "{err}");

    let err = config_json(&content(tiny_metadata(), &["rope_freqs.weight"])).expect_err("rope");
    assert!(err.to_string().contains("rope_freqs"), "{err}");
}

#[test]
fn files_are_read_and_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("tiny.gguf");
    let meta = tiny_metadata();
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t = Tensor::ones((4, 32), candle_core::DType::F32, &Device::Cpu).expect("t");
    let q = QTensor::quantize(&t, GgmlDType::F32).expect("q");
    let mut f = std::fs::File::create(&path).expect("create");
    candle_core::quantized::gguf_file::write(&mut f, &refs, &[("output.weight", &q)])
        .expect("write");
    drop(f);
    let read = GgufMetadata::read(&path).expect("read");
    assert!(read.has_tensor("output.weight"));
    assert_eq!(read.tensor_shape("output.weight"), Some(vec![4, 32]));
    let files = read.view_files().expect("view");
    let names: Vec<_> = files.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    assert_eq!(find_gguf(&path).expect("file"), Some(path.clone()));
    assert_eq!(find_gguf(tmp.path()).expect("dir"), Some(path.clone()));
    std::fs::copy(&path, tmp.path().join("other.gguf")).expect("copy");
    let err = find_gguf(tmp.path()).expect_err("two");
    assert!(err.to_string().contains("other.gguf, tiny.gguf"), "{err}");
    std::fs::write(tmp.path().join("config.json"), "{}").expect("config");
    assert_eq!(find_gguf(tmp.path()).expect("hf dir"), None);

    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").expect("junk");
    let err = GgufMetadata::read(&junk).expect_err("junk");
    assert!(matches!(err, GgufError::Format { .. }), "{err:?}");
}
