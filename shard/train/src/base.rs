//! The base model adapters train on: a directory Medley serves (`config.json`, weights,
//! `tokenizer.json`), or a GGUF file, staged as the same model view `medley serve` reads it
//! through (`config.json` and tokenizer files from its metadata, a `model.gguf` link; the
//! weights are dequantized to f32 when loaded, see [`crate::Llama::load`]).

use std::path::{Path, PathBuf};

use medley_demo::tokenizer::{ENDOFTEXT_ID, EOS_ID};
use tokenizers::Tokenizer;

use crate::TrainError;

/// The directory under `out` a GGUF base is staged in.
pub const VIEW_DIR: &str = "base-view";

/// The model directory of `base`: `base` itself, or, when it names a GGUF file (or a directory
/// whose only model file is one), its model view written to `out/`[`VIEW_DIR`] (replaced if
/// present).
pub fn stage_base(base: &Path, out: &Path) -> Result<PathBuf, TrainError> {
    let Some(gguf) = medley_hub::gguf::find_gguf(base)? else {
        return Ok(base.to_path_buf());
    };
    let dir = out.join(VIEW_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    medley_hub::gguf::write_view(&gguf, &dir)?;
    tracing::info!(gguf = %gguf.display(), view = %dir.display(), "staged the GGUF base");
    Ok(dir)
}

/// Checks that `tok` has the special tokens the demo's examples are encoded with at the ids the
/// encoder uses: `<|im_end|>` ends every completion, `<|endoftext|>` separates corpus documents.
/// (The demo tokenizer puts them where SmolLM2's does.)
pub fn check_special_tokens(tok: &Tokenizer) -> Result<(), TrainError> {
    for (token, want) in [("<|im_end|>", EOS_ID), ("<|endoftext|>", ENDOFTEXT_ID)] {
        let got = tok.token_to_id(token);
        if got != Some(want) {
            let got = got.map_or_else(|| "absent".to_string(), |id| format!("id {id}"));
            return Err(TrainError::Config(format!(
                "the base's tokenizer has {token} {got}; the demo tasks need it as id {want}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor};

    use medley_shard::fixture::{FixtureDType, ModelFixture};

    use super::*;
    use crate::Llama;

    /// A GGUF file of the repo's tiny Llama, staged and loaded, gives the model the safetensors
    /// directory gives, with its tokenizer.
    #[test]
    fn a_gguf_base_loads_like_its_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("tiny");
        let fx = ModelFixture::tiny(FixtureDType::F32);
        medley_shard::fixture::write_model(&model_dir, &fx).unwrap();
        let gguf = dir.path().join("tiny.gguf");
        medley_shard::fixture::write_gguf(&model_dir, &gguf, GgmlDType::F32).unwrap();
        let out = dir.path().join("out");
        assert_eq!(stage_base(&model_dir, &out).unwrap(), model_dir);
        let view = stage_base(&gguf, &out).unwrap();
        assert_eq!(view, out.join(VIEW_DIR));
        // Staging again replaces the view.
        assert_eq!(stage_base(&gguf, &out).unwrap(), view);
        let a = Llama::load(&model_dir, DType::F32, &Device::Cpu).unwrap();
        let b = Llama::load(&view, DType::F32, &Device::Cpu).unwrap();
        let (sa, mut sb) = (a.shape().clone(), b.shape().clone());
        // GGUF stores the epsilon as an f32.
        assert!((sa.rms_norm_eps - sb.rms_norm_eps).abs() < 1e-12);
        sb.rms_norm_eps = sa.rms_norm_eps;
        assert_eq!(sa, sb);
        let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu).unwrap();
        let la = a.forward(&ids, Default::default()).unwrap();
        let lb = b.forward(&ids, Default::default()).unwrap();
        let diff = (la - lb).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        assert!(Tokenizer::from_file(view.join("tokenizer.json")).is_ok());
    }

    #[test]
    fn special_tokens_are_checked() {
        let tok = medley_demo::tokenizer::tokenizer(&Default::default()).unwrap();
        check_special_tokens(&tok).unwrap();
        let other = medley_shard::fixture::build_tokenizer(64).unwrap();
        let err = check_special_tokens(&other).unwrap_err().to_string();
        assert!(err.contains("<|im_end|>"), "{err}");
    }
}
