//! What the training forward supports of an architecture: Medley's own [`ModelConfig`] (the
//! type the server loads a checkpoint into, and that writes `config.json`) restricted to a
//! plain Llama without RoPE scaling or a sliding window.

use std::path::Path;

use medley_shard::model::ModelConfig;

use crate::TrainError;

/// Checks that `cfg` is consistent ([`ModelConfig::validate`]), that the training forward
/// implements it, and that its special tokens are inside the vocabulary.
pub fn check_trainable(cfg: &ModelConfig) -> Result<(), TrainError> {
    cfg.validate()?;
    let unsupported = |what: &str| {
        Err(TrainError::Config(format!(
            "{what} is not supported by the training forward"
        )))
    };
    if cfg.rope_scaling.is_some() {
        return unsupported("rope_scaling");
    }
    if cfg.sliding_window.is_some() {
        return unsupported("a sliding attention window");
    }
    let specials = cfg.bos_token_id.iter().map(|id| ("bos", id));
    for (name, id) in specials.chain(cfg.eos_token_ids.iter().map(|id| ("eos", id))) {
        if *id as usize >= cfg.vocab_size {
            return Err(TrainError::Config(format!(
                "{name}_token_id {id} is outside the vocabulary"
            )));
        }
    }
    Ok(())
}

/// Reads a `config.json` as Medley's server does and checks that the training forward can run
/// it ([`check_trainable`]).
pub fn read_config(path: &Path) -> Result<ModelConfig, TrainError> {
    let cfg = ModelConfig::from_file(path)?;
    check_trainable(&cfg)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use medley_shard::model::{LlamaDims, RopeScaling};

    use super::*;

    fn llama(kv_heads: usize) -> ModelConfig {
        ModelConfig::llama(LlamaDims {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 80,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: kv_heads,
        })
    }

    #[test]
    fn written_config_reads_back_and_is_checked() {
        let mut s = llama(2);
        s.eos_token_ids = vec![2];
        check_trainable(&s).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, s.hf_config_json().to_string()).unwrap();
        assert_eq!(read_config(&path).unwrap(), s);

        assert!(check_trainable(&llama(3)).is_err());
        let mut scaled = s.clone();
        scaled.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
        assert!(check_trainable(&scaled).is_err());
        let mut windowed = s.clone();
        windowed.sliding_window = Some(8);
        assert!(check_trainable(&windowed).is_err());
        let mut eos_outside = s;
        eos_outside.eos_token_ids = vec![64];
        assert!(check_trainable(&eos_outside).is_err());
    }
}
