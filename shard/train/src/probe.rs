//! How well a model copies from its context: teacher-forced next-token accuracy on the copied
//! half of [`medley_demo::recall::list_copy`] documents drawn from a stream the corpus never
//! uses. Every demo task copies values from its prompt, so a base that scores low here gives
//! adapters that write each task's template with the wrong values; the pretraining log shows it
//! rise (an induction circuit forming) beside the loss.

use candle_core::{D, DType};
use tokenizers::Tokenizer;

use crate::TrainError;
use crate::corpus::encode;
use crate::data::{Batch, Sequence};
use crate::lora::LoraSet;
use crate::loss::scalar;
use crate::model::{ForwardOptions, Llama};

/// Held-out copy documents, tokenized once.
#[derive(Debug, Clone)]
pub struct CopyProbe {
    seqs: Vec<Sequence>,
}

impl CopyProbe {
    /// `n` documents from the `(seed, "copy-probe")` stream.
    pub fn new(tok: &Tokenizer, seed: u64, n: usize) -> Result<Self, TrainError> {
        let mut rng = crate::params::stream(seed, "copy-probe");
        let seqs = (0..n)
            .map(|_| {
                let (prefix, copy) = medley_demo::recall::list_copy(&mut rng);
                Ok(Sequence::prompt_completion(
                    &encode(tok, &prefix)?,
                    &encode(tok, &copy)?,
                ))
            })
            .collect::<Result<_, TrainError>>()?;
        Ok(Self { seqs })
    }

    /// The fraction of copied tokens `model` (with `lora`, if any) predicts exactly.
    pub fn accuracy(&self, model: &Llama, lora: Option<&LoraSet>) -> Result<f64, TrainError> {
        let model = model.frozen();
        let device = model.params().device().clone();
        let (mut hits, mut total) = (0.0f64, 0.0f64);
        for chunk in self.seqs.chunks(32) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let batch = Batch::new(&refs, usize::MAX, 0, DType::F32, &device)?;
            let logits = model.forward(
                &batch.ids,
                ForwardOptions {
                    lora,
                    dropout: None,
                    frozen: None,
                },
            )?;
            let predicted = logits.argmax(D::Minus1)?.flatten_all()?;
            let right = predicted.eq(&batch.targets)?.to_dtype(DType::F32)?;
            hits += scalar(&(right * &batch.weights)?.sum_all()?)?;
            total += batch.num_targets as f64;
        }
        Ok(if total > 0.0 { hits / total } else { 0.0 })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::Device;

    use super::*;
    use crate::model::InitConfig;
    use medley_shard::model::{LlamaDims, ModelConfig};

    #[test]
    fn a_random_model_does_not_copy() {
        let tok = medley_demo::tokenizer(&medley_demo::tokenizer::TokenizerOptions {
            seed: 0,
            corpus_docs: 300,
            examples_per_task: 50,
            vocab_size: 400,
        })
        .unwrap();
        let probe = CopyProbe::new(&tok, 0, 20).unwrap();
        assert_eq!(probe.seqs.len(), 20);
        assert!(probe.seqs.iter().all(|s| s.targets.iter().any(|t| *t)));
        let shape = ModelConfig::llama(LlamaDims {
            vocab_size: tok.get_vocab_size(true),
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
        });
        let init = InitConfig { seed: 0, std: 0.02 };
        let model = Llama::init(&shape, init, DType::F32, &Device::Cpu).unwrap();
        let acc = probe.accuracy(&model, None).unwrap();
        assert!((0.0..0.2).contains(&acc), "{acc}");
    }
}
