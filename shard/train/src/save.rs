//! Writing what Medley loads: the base as a Hugging Face Llama directory and adapters as PEFT
//! directories (through `medley_merge::peft`, the writer and reader Medley itself uses).

use std::path::Path;

use candle_core::DType;
use medley_merge::Matrix;
use medley_merge::peft::{TENSOR_PREFIX, TensorDtype, write_adapter_files};
use serde_json::json;

use crate::TrainError;
use crate::lora::LoraSet;
use crate::model::Llama;

/// Storage dtype of a saved base model (Medley loads all three; f32 keeps the trained values
/// exactly, bf16 halves the size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl SaveDtype {
    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// Writes `dir/config.json`, `dir/generation_config.json` and `dir/model.safetensors`.
pub fn write_base(dir: &Path, model: &Llama, dtype: SaveDtype) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let shape = model.shape();
    let write_json = |name: &str, v: serde_json::Value| -> Result<(), TrainError> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .map_err(|e| TrainError::io(&path, e))
    };
    let mut config = shape.clone();
    config.torch_dtype = dtype.candle();
    write_json("config.json", config.hf_config_json())?;
    write_json("generation_config.json", config.generation_config_json())?;
    model
        .params()
        .save_safetensors(&dir.join("model.safetensors"), dtype.candle())?;
    Ok(())
}

/// What goes into `adapter_config.json` besides the LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdapterMeta {
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

/// Writes `lora` as a PEFT directory: `adapter_config.json` (`peft_type` LORA, `task_type`
/// CAUSAL_LM, `r`, `lora_alpha`, `target_modules`, `lora_dropout`) and f32
/// `adapter_model.safetensors` with PEFT's tensor names.
pub fn write_adapter(dir: &Path, lora: &LoraSet, meta: &AdapterMeta) -> Result<(), TrainError> {
    let cfg = lora.config();
    let mut targets: Vec<&str> = cfg.targets.iter().map(|t| t.module_name()).collect();
    targets.sort_unstable();
    targets.dedup();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": false,
        "target_modules": targets,
        "fan_in_fan_out": false,
        "bias": "none",
        "lora_dropout": cfg.dropout,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
    });
    let tensors = lora
        .params()
        .iter()
        .map(|(name, var)| {
            let (rows, cols) = var.dims2()?;
            let data = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let m = Matrix::new(rows, cols, data).map_err(|e| TrainError::Config(e.to_string()))?;
            Ok((format!("{TENSOR_PREFIX}{name}"), m))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    write_adapter_files(dir, &config, &tensors, TensorDtype::F32)?;
    Ok(())
}

/// Reads the PEFT adapter in `dir` (as [`write_adapter`] writes it) into `lora`, whose shape
/// (rank, targets, layers) it must have.
pub fn read_adapter(dir: &Path, lora: &LoraSet) -> Result<(), TrainError> {
    let path = dir.join("adapter_model.safetensors");
    let loaded = candle_core::safetensors::load(&path, lora.params().device())
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    let tensors = loaded
        .into_iter()
        .map(|(name, t)| {
            let name = name
                .strip_prefix(TENSOR_PREFIX)
                .unwrap_or(&name)
                .to_string();
            (name, t)
        })
        .collect();
    lora.params()
        .load_tensors(tensors, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::Device;

    use super::*;
    use crate::lora::LoraConfig;
    use crate::train::tests::tiny;

    fn set(seed: u64, rank: usize) -> LoraSet {
        let cfg = LoraConfig {
            seed,
            rank,
            ..LoraConfig::default()
        };
        LoraSet::init(&tiny(), &cfg, DType::F32, &Device::Cpu).unwrap()
    }

    fn values(lora: &LoraSet) -> Vec<(String, Vec<f32>)> {
        let mut v: Vec<_> = lora
            .params()
            .iter()
            .map(|(n, var)| {
                let data = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                (n.clone(), data)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn an_adapter_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let written = set(1, 4);
        // B starts at zero: give it values so the round trip checks them too.
        for (name, var) in written.params().iter() {
            if name.contains("lora_B") {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.25).unwrap())
                    .unwrap();
            }
        }
        let meta = AdapterMeta {
            base_model_name_or_path: None,
        };
        write_adapter(dir.path(), &written, &meta).unwrap();
        let read = set(2, 4);
        assert_ne!(values(&read), values(&written));
        read_adapter(dir.path(), &read).unwrap();
        assert_eq!(values(&read), values(&written));
        // A different rank is an error naming the file, not a silent partial load.
        let err = read_adapter(dir.path(), &set(2, 8))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shape"), "{err}");
        let missing = read_adapter(&dir.path().join("nope"), &set(2, 4)).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
