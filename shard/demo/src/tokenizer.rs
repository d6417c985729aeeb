//! The demo tokenizer: byte-level BPE trained on the base corpus and the three tasks' training
//! splits, ChatML special tokens, no BOS, `<|im_end|>` as EOS.
//!
//! **Vocabulary size 2048.** The demo's text uses a few hundred distinct words; with their
//! space-prefixed and capitalised forms, numbers and the SQL/ChatML punctuation that is roughly
//! a thousand frequent pre-tokens. 2048 entries (3 specials, 256 bytes, ~1,800 merges) are
//! enough for nearly every one of them to become a single token, which keeps every example well
//! under 64 tokens and makes copying from the prompt a token-level copy. Far more would only add
//! embedding rows that are rarely trained (at d = 256 each 1,024 entries cost 0.26 M parameters,
//! twice with untied embeddings, out of a 1–5 M budget); far fewer would split words into
//! pieces. Training stops early if fewer merges reach the minimum frequency, so the real size
//! is `tokenizer.get_vocab_size(true)` (at most [`VOCAB_SIZE`]).
//!
//! **Files.** [`write_tokenizer`] writes `tokenizer.json` and a `tokenizer_config.json` with
//! `eos_token` `<|im_end|>`, `pad_token` `<|endoftext|>`, no BOS and the ChatML
//! [`CHAT_TEMPLATE`]. The router takes the chat template from `tokenizer_config.json` (for
//! `/v1/chat/completions`); the shard stops on `eos_token_id` of the model's `config.json`,
//! which the trainer sets to [`EOS_ID`].

use std::path::Path;

use medley_shard::fixture::{
    TokenizerConfigSpec, TokenizerSpec, train_tokenizer, write_tokenizer_files,
};
use tokenizers::Tokenizer;

use crate::{DemoError, Split, Task, base_corpus, generate};

/// Document separator and padding token (id 0).
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Start of a ChatML turn (id 1).
pub const IM_START: &str = "<|im_start|>";
/// End of a ChatML turn and the end-of-sequence token of every task (id 2).
pub const IM_END: &str = "<|im_end|>";
/// The EOS token the trainer appends to each completion.
pub const EOS_TOKEN: &str = IM_END;
/// Special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];
/// Id of `<|endoftext|>`.
pub const ENDOFTEXT_ID: u32 = 0;
/// Id of `<|im_start|>`.
pub const IM_START_ID: u32 = 1;
/// Id of `<|im_end|>`, the EOS (`eos_token_id` in the model's `config.json`).
pub const EOS_ID: u32 = 2;
/// Requested vocabulary size (an upper bound, see the module docs).
pub const VOCAB_SIZE: usize = 2048;
/// Longest prompt + completion + EOS of any task example, in tokens.
pub const MAX_EXAMPLE_TOKENS: usize = 64;

/// The ChatML chat template (transformers' usual one): each message as
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// What the demo tokenizer is trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Seed of the base corpus and the training splits.
    pub seed: u64,
    /// Base corpus documents.
    pub corpus_docs: usize,
    /// Training examples per task.
    pub examples_per_task: usize,
    /// Vocabulary size (upper bound).
    pub vocab_size: usize,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            corpus_docs: 20_000,
            examples_per_task: 5_000,
            vocab_size: VOCAB_SIZE,
        }
    }
}

/// Trains the demo tokenizer.
pub fn tokenizer(options: &TokenizerOptions) -> Result<Tokenizer, DemoError> {
    let mut texts = base_corpus(options.seed, options.corpus_docs);
    for task in Task::ALL {
        texts.extend(
            generate(task, Split::Train, options.seed, options.examples_per_task)
                .into_iter()
                .map(|e| format!("{}{}{EOS_TOKEN}", e.prompt, e.completion)),
        );
    }
    let spec = TokenizerSpec {
        corpus: texts.iter().map(String::as_str).collect(),
        vocab_size: options.vocab_size,
        min_frequency: 2,
        special_tokens: SPECIAL_TOKENS.map(String::from).to_vec(),
        bos: None,
    };
    let tokenizer = train_tokenizer(&spec)?;
    tracing::debug!(
        vocab = tokenizer.get_vocab_size(true),
        docs = texts.len(),
        "trained the demo tokenizer"
    );
    Ok(tokenizer)
}

/// The demo's `tokenizer_config.json`.
pub fn tokenizer_config() -> TokenizerConfigSpec {
    TokenizerConfigSpec {
        bos_token: None,
        eos_token: EOS_TOKEN.into(),
        unk_token: None,
        pad_token: Some(ENDOFTEXT.into()),
        add_bos_token: false,
        chat_template: Some(CHAT_TEMPLATE.into()),
        model_max_length: 256,
    }
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing).
pub fn write_tokenizer(tokenizer: &Tokenizer, dir: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir)?;
    write_tokenizer_files(tokenizer, &tokenizer_config(), dir)?;
    Ok(())
}

/// The token ids the trainer trains on for one example: the prompt's, then the completion's,
/// then [`EOS_ID`]; and how many of them are the prompt's (the loss is taken on the rest).
/// Encoding the two parts apart equals encoding their concatenation for every task (a test
/// checks it), so the prompt's ids are exactly what the server sees at evaluation.
pub fn encode_example(
    tokenizer: &Tokenizer,
    prompt: &str,
    completion: &str,
) -> Result<(Vec<u32>, usize), DemoError> {
    let encode = |text: &str| {
        tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DemoError::Tokenizer(e.to_string()))
    };
    let mut ids = encode(prompt)?;
    let prompt_len = ids.len();
    ids.extend(encode(completion)?);
    ids.push(EOS_ID);
    Ok((ids, prompt_len))
}

#[cfg(test)]
mod tests;
