//! Streaming detokenization against full decodes, with the fixture tokenizer.

use std::path::PathBuf;
use std::sync::OnceLock;

use super::*;
use crate::fixture::{EOS_ID, build_tokenizer};

/// The fixture tokenizer trained in-process (once per test binary), plus the committed
/// `tests/fixtures/tiny-llama/tokenizer.json` when it exists.
fn tokenizers() -> &'static [Tokenizer] {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let mut all = vec![build_tokenizer(512).expect("fixture tokenizer")];
        let committed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama/tokenizer.json");
        if committed.exists() {
            all.push(Tokenizer::from_file(&committed).expect("committed tokenizer"));
        }
        all
    })
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tok.encode(text, special)
        .expect("encode")
        .get_ids()
        .to_vec()
}

/// Pushes `generated` one token at a time and returns what each push produced.
fn stream(tok: &Tokenizer, prompt: &[u32], generated: &[u32]) -> (IncrementalDecoder, Vec<String>) {
    let mut dec = IncrementalDecoder::new(prompt);
    let pieces = generated
        .iter()
        .map(|&id| dec.push(tok, id).expect("push"))
        .collect();
    (dec, pieces)
}

#[test]
fn streaming_equals_full_decode_with_split_characters() {
    let text = " says ünïcödé 🦀 and 日本語, then «quotes» and done.";
    for tok in tokenizers() {
        let prompt = encode(tok, "The quick brown fox", true);
        let generated = encode(tok, text, false);
        // The test is only meaningful if some token is a fragment of a character.
        let fragments = generated
            .iter()
            .filter(|&&id| {
                tok.decode(&[id], false)
                    .expect("decode")
                    .contains('\u{FFFD}')
            })
            .count();
        assert!(fragments >= 4, "only {fragments} split-character tokens");

        let (dec, pieces) = stream(tok, &prompt, &generated);
        for p in &pieces {
            assert!(
                !p.contains('\u{FFFD}'),
                "replacement character streamed: {pieces:?}"
            );
        }
        let full = tok.decode(&generated, false).expect("decode");
        assert_eq!(pieces.concat(), full);
        assert_eq!(full, text);
        assert_eq!(dec.generated_ids(), &generated[..]);
        // Fragments stream as empty strings until their character completes.
        assert!(pieces.iter().filter(|p| p.is_empty()).count() >= fragments / 2);
    }
}

#[test]
fn an_emoji_split_into_bytes_comes_out_whole() {
    for tok in tokenizers() {
        let generated = encode(tok, "🦀", false);
        assert!(
            generated.len() >= 2,
            "emoji is a single token: {generated:?}"
        );
        let (_, pieces) = stream(tok, &encode(tok, "x", true), &generated);
        let (last, rest) = pieces.split_last().expect("pieces");
        assert!(rest.iter().all(String::is_empty), "{pieces:?}");
        assert_eq!(last, "🦀");
    }
}

#[test]
fn flush_returns_an_unfinished_character_as_a_full_decode_would() {
    for tok in tokenizers() {
        let mut generated = encode(tok, "ab🦀", false);
        generated.pop();
        let (mut dec, pieces) = stream(tok, &[], &generated);
        let tail = dec.flush(tok).expect("flush");
        assert!(tail.contains('\u{FFFD}'));
        let full = tok.decode(&generated, false).expect("decode");
        assert_eq!(pieces.concat() + &tail, full);
        assert_eq!(dec.flush(tok).expect("flush"), "");
    }
}

#[test]
fn special_tokens_are_decoded_and_prompt_context_is_not_repeated() {
    for tok in tokenizers() {
        let prompt = encode(tok, "one two three four five six seven", true);
        let eight = encode(tok, " eight", false);
        let mut dec = IncrementalDecoder::new(&prompt);
        let mut out = String::new();
        for &id in &eight {
            out += &dec.push(tok, id).expect("push");
        }
        assert_eq!(out, " eight");
        assert_eq!(dec.push(tok, EOS_ID).expect("push"), "</s>");
        assert_eq!(dec.generated_ids().len(), eight.len() + 1);
    }
}

#[test]
fn empty_prompt_and_unknown_ids_do_not_panic() {
    for tok in tokenizers() {
        let mut dec = IncrementalDecoder::new(&[]);
        let hello = encode(tok, "hello", false);
        let mut out = String::new();
        for &id in &hello {
            out += &dec.push(tok, id).expect("push");
        }
        assert_eq!(out, "hello");
        // The tokenizer skips ids it does not know: no text, no error, no panic.
        assert_eq!(dec.push(tok, 1_000_000).expect("push"), "");
        assert_eq!(
            dec.push(tok, hello[0]).expect("push"),
            tok.decode(&hello[..1], false).expect("d")
        );
    }
}
