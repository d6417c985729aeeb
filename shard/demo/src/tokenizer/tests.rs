#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::OnceLock;

use medley_router::http::openai::template::{ChatTemplate, TemplateMessage};

use super::*;
use crate::instruct::chatml_prompt;
use crate::{Example, base_corpus};

/// The default demo tokenizer, trained once per test binary.
fn demo() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| tokenizer(&TokenizerOptions::default()).unwrap())
}

fn ids(text: &str) -> Vec<u32> {
    demo().encode(text, true).unwrap().get_ids().to_vec()
}

/// Training examples and the held-out sets of every task.
fn examples() -> Vec<Example> {
    Task::ALL
        .into_iter()
        .flat_map(|t| {
            let mut v = generate(t, Split::Train, 7, 2000);
            v.extend(generate(t, Split::Heldout, 0, 100));
            v
        })
        .collect()
}

#[test]
fn specials_are_single_tokens_with_fixed_ids_and_no_bos_is_added() {
    let tok = demo();
    for (id, special) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(special), Some(id as u32));
        assert_eq!(ids(special), vec![id as u32]);
    }
    assert_eq!(tok.token_to_id(EOS_TOKEN), Some(EOS_ID));
    assert_eq!(tok.token_to_id(IM_START), Some(IM_START_ID));
    assert_eq!(tok.token_to_id(ENDOFTEXT), Some(ENDOFTEXT_ID));
    let vocab = tok.get_vocab_size(true);
    assert!((1500..=VOCAB_SIZE).contains(&vocab), "vocab {vocab}");
    // No BOS, no post-processor: with or without special tokens the encoding is the same.
    let text = "Alice lives in Paris.";
    assert_eq!(
        tok.encode(text, true).unwrap().get_ids(),
        tok.encode(text, false).unwrap().get_ids()
    );
}

#[test]
fn text_round_trips() {
    let tok = demo();
    let mut texts = base_corpus(3, 300);
    texts.extend(
        examples()
            .into_iter()
            .map(|e| format!("{}{}", e.prompt, e.completion)),
    );
    texts.push("Unseen: Zürich, 12345 ünïcödé!".into());
    for text in texts {
        let got = tok.decode(&ids(&text), false).unwrap();
        assert_eq!(got, text);
    }
}

#[test]
fn examples_fit_in_64_tokens_and_split_cleanly() {
    let mut longest = 0;
    for ex in examples() {
        let (seq, prompt_len) = encode_example(demo(), &ex.prompt, &ex.completion).unwrap();
        // Encoding prompt and completion apart is encoding them together: the prompt the server
        // sees at evaluation is exactly the prefix the adapter was trained on.
        let whole = ids(&format!("{}{}{EOS_TOKEN}", ex.prompt, ex.completion));
        assert_eq!(seq, whole, "{ex:?}");
        assert_eq!(&seq[..prompt_len], ids(&ex.prompt).as_slice());
        assert!(
            seq.len() <= MAX_EXAMPLE_TOKENS,
            "{} tokens: {ex:?}",
            seq.len()
        );
        longest = longest.max(seq.len());
    }
    assert!(longest > 16, "{longest}");
}

#[test]
fn chatml_prompts_encode_as_the_trainer_expects() {
    let tok = demo();
    let newline = tok.token_to_id("Ċ").unwrap();
    let user = tok.token_to_id("user").unwrap();
    let assistant = tok.token_to_id("assistant").unwrap();
    let prompt = ids(&chatml_prompt("What is 7 plus 5?"));
    assert_eq!(&prompt[..3], &[IM_START_ID, user, newline]);
    assert_eq!(
        &prompt[prompt.len() - 5..],
        &[EOS_ID, newline, IM_START_ID, assistant, newline]
    );
    let (seq, _) = encode_example(tok, &chatml_prompt("What is 7 plus 5?"), "12").unwrap();
    assert_eq!(seq.last(), Some(&EOS_ID));
    assert_eq!(tok.decode(&seq[prompt.len()..], true).unwrap(), "12");
}

#[test]
fn base_corpus_documents_are_short() {
    let longest = base_corpus(0, 5000)
        .iter()
        .map(|d| ids(d).len())
        .max()
        .unwrap();
    assert!(longest <= 2 * MAX_EXAMPLE_TOKENS, "{longest}");
}

#[test]
fn training_is_deterministic() {
    let options = TokenizerOptions {
        corpus_docs: 3000,
        examples_per_task: 500,
        vocab_size: 1024,
        ..TokenizerOptions::default()
    };
    let a = tokenizer(&options).unwrap().to_string(false).unwrap();
    let b = tokenizer(&options).unwrap().to_string(false).unwrap();
    assert_eq!(a, b);
}

#[test]
fn files_serve_unchanged_with_the_routers_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(demo(), dir.path()).unwrap();
    let reloaded = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let text = chatml_prompt("Count the words: moon, river");
    assert_eq!(
        reloaded.encode(text.as_str(), true).unwrap().get_ids(),
        ids(&text).as_slice()
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["eos_token"], EOS_TOKEN);
    assert_eq!(config["pad_token"], ENDOFTEXT);
    assert_eq!(config["add_bos_token"], false);
    assert!(config.get("bos_token").is_none());
    // The router's own loader renders a user turn exactly as the instruct prompts are written.
    let template = ChatTemplate::load(dir.path()).unwrap();
    let rendered = template
        .render(&[TemplateMessage {
            role: "user".into(),
            content: "What is 7 plus 5?".into(),
            name: None,
        }])
        .unwrap();
    assert_eq!(rendered, chatml_prompt("What is 7 plus 5?"));
}

/// Every token the tasks use is in the base corpus too, so the base model trains its embedding
/// and output row (a LoRA adapter leaves both frozen); only the prompt markers are left out.
#[test]
fn base_corpus_covers_every_task_token() {
    let tok = demo();
    let corpus: HashSet<u32> = base_corpus(0, 20_000).iter().flat_map(|d| ids(d)).collect();
    let markers: HashSet<u32> = ["Schema", "Question", "SQL", "Product", "Tone", "Ad"]
        .iter()
        .filter_map(|m| tok.token_to_id(m))
        .collect();
    let mut missing = std::collections::BTreeSet::new();
    for task in Task::ALL {
        for ex in generate(task, Split::Train, 0, 3000) {
            let (seq, _) = encode_example(tok, &ex.prompt, &ex.completion).unwrap();
            for id in seq {
                if !corpus.contains(&id) && !markers.contains(&id) {
                    missing.insert(tok.id_to_token(id).unwrap());
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "tokens not in the base corpus: {missing:?}"
    );
}
