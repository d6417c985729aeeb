//! The demo's pretraining text as packed windows: the base corpus (with list copies and
//! repeated documents mixed in) and the list copies alone of the copy stage.

use medley_demo::base_corpus;
use medley_demo::tokenizer::ENDOFTEXT_ID;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::TrainError;
use crate::data::{Sequence, pack};
use crate::demo::DemoConfig;

/// Token ids of `text` (no special tokens added).
pub(crate) fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, TrainError> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TrainError::Demo(e.to_string()))
}

/// One list copy ([`medley_demo::recall::list_copy`]) as token ids, prefix then copy.
fn list_copy_ids(tok: &Tokenizer, rng: &mut ChaCha8Rng) -> Result<Vec<u32>, TrainError> {
    let (prefix, copy) = medley_demo::recall::list_copy(rng);
    encode(tok, &(prefix + &copy))
}

/// The base corpus as packed pretraining windows of `cfg.seq_len` tokens:
/// `base_corpus(cfg.seed, cfg.corpus_docs)`, each document followed by `<|endoftext|>`; a
/// `cfg.copy_docs` fraction of the documents is replaced by list copies
/// ([`medley_demo::recall::list_copy`]) and a `cfg.repeat_docs` fraction of the rest is written
/// twice in a row (`doc doc <|endoftext|>`), both drawn from the seed.
pub fn corpus_windows(tok: &Tokenizer, cfg: &DemoConfig) -> Result<Vec<Sequence>, TrainError> {
    let mut rng = crate::params::stream(cfg.seed, "repeat-docs");
    let mut copies = crate::params::stream(cfg.seed, "copy-docs");
    let docs = base_corpus(cfg.seed, cfg.corpus_docs)
        .iter()
        .map(|doc| {
            let mut ids = if copies.random::<f64>() < cfg.copy_docs {
                list_copy_ids(tok, &mut copies)?
            } else {
                let mut ids = encode(tok, doc)?;
                if rng.random::<f64>() < cfg.repeat_docs {
                    ids.extend_from_within(..);
                }
                ids
            };
            ids.push(ENDOFTEXT_ID);
            Ok(ids)
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    Ok(pack(&docs, cfg.seq_len))
}

/// Packed windows of list copies alone ([`medley_demo::recall::list_copy`]) for
/// [`DemoConfig::copy_stage_steps`]: enough documents for every step to see fresh ones.
pub fn copy_windows(tok: &Tokenizer, cfg: &DemoConfig) -> Result<Vec<Sequence>, TrainError> {
    let mut rng = crate::params::stream(cfg.seed, "copy-stage");
    let tokens = cfg.copy_stage_steps * cfg.pretrain.batch_size * cfg.seq_len;
    let (mut docs, mut total) = (Vec::new(), 0);
    while total < tokens {
        let mut ids = list_copy_ids(tok, &mut rng)?;
        ids.push(ENDOFTEXT_ID);
        total += ids.len();
        docs.push(ids);
    }
    Ok(pack(&docs, cfg.seq_len))
}
