//! Reading PEFT LoRA adapters into [`LoraAdapter`]s.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::{AdapterConfig, CONFIG_FILE, PeftError, TENSOR_PREFIX, WEIGHTS_FILE};
use crate::adapter::{LoraAdapter, LoraModule};
use crate::matrix::{Matrix, SharedBytes};

/// An adapter read from PEFT files: its config and its factors.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// The parsed `adapter_config.json`.
    pub config: AdapterConfig,
    /// The factors, with per-module scales.
    pub adapter: LoraAdapter,
}

/// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
///
/// The weights file is memory-mapped and f32 tensors are used in place (no copy); bf16/f16
/// tensors are decoded. Like every reader of memory-mapped weights, this assumes the file is not
/// truncated or rewritten in place while the adapter is alive (replacing it by a rename is fine).
pub fn read_adapter_dir(dir: &Path) -> Result<PeftAdapter, PeftError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| PeftError::io(&cfg_path, e))?;
    let st_path = dir.join(WEIGHTS_FILE);
    let file = std::fs::File::open(&st_path).map_err(|e| PeftError::io(&st_path, e))?;
    // SAFETY: the mapping is read-only and only read through `&[u8]`; see the note above about
    // concurrent modification of the file.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| PeftError::io(&st_path, e))?;
    let bytes: Arc<dyn SharedBytes> = Arc::new(map);
    parse(&text, &bytes)
}

/// Which factor a tensor name holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

/// Splits `base_model.model.<path>.lora_{A,B}.weight` into the module path and factor.
fn classify(name: &str) -> Result<(&str, Factor), PeftError> {
    if name.contains("lora_embedding_A") || name.contains("lora_embedding_B") {
        return Err(PeftError::Unsupported {
            feature: "lora_embedding".into(),
            detail: format!("embedding LoRA ({name})"),
        });
    }
    if name.contains("lora_magnitude_vector") {
        return Err(PeftError::Unsupported {
            feature: "use_dora".into(),
            detail: format!("DoRA magnitude vectors ({name})"),
        });
    }
    let unexpected = || PeftError::UnexpectedTensor {
        name: name.to_string(),
    };
    let rest = name.strip_prefix(TENSOR_PREFIX).ok_or_else(unexpected)?;
    if let Some(path) = rest.strip_suffix(".lora_A.weight") {
        Ok((path, Factor::A))
    } else if let Some(path) = rest.strip_suffix(".lora_B.weight") {
        Ok((path, Factor::B))
    } else {
        Err(unexpected())
    }
}

/// Decodes a 2-D f32/bf16/f16 tensor to an f32 matrix; f32 data inside `shared` is borrowed
/// instead of copied.
fn decode(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    shared: Option<&Arc<dyn SharedBytes>>,
) -> Result<Matrix, PeftError> {
    let bad = |detail: String| PeftError::Tensor {
        name: name.to_string(),
        detail,
    };
    let &[rows, cols] = view.shape() else {
        return Err(bad(format!(
            "expected a 2-D tensor, found shape {:?}",
            view.shape()
        )));
    };
    let bytes = view.data();
    if let (Dtype::F32, Some(buf)) = (view.dtype(), shared) {
        let base = (**buf).as_ref().as_ptr() as usize;
        let offset = (bytes.as_ptr() as usize).wrapping_sub(base);
        if let Some(m) = Matrix::shared(rows, cols, Arc::clone(buf), offset) {
            if !m.is_finite() {
                return Err(PeftError::NonFinite {
                    name: name.to_string(),
                });
            }
            return Ok(m);
        }
    }
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(bad(format!(
                "dtype {other:?} is not supported (use f32, bf16 or f16)"
            )));
        }
    };
    if data.iter().any(|v| !v.is_finite()) {
        return Err(PeftError::NonFinite {
            name: name.to_string(),
        });
    }
    Matrix::new(rows, cols, data).map_err(|e| bad(e.to_string()))
}

/// Parses an adapter from the config text and the safetensors bytes (values are copied).
pub fn parse_adapter(config_json: &str, safetensors: &[u8]) -> Result<PeftAdapter, PeftError> {
    parse_with(config_json, safetensors, None)
}

/// Parses an adapter whose f32 tensors borrow from `bytes`.
fn parse(config_json: &str, bytes: &Arc<dyn SharedBytes>) -> Result<PeftAdapter, PeftError> {
    parse_with(config_json, (**bytes).as_ref(), Some(bytes))
}

fn parse_with(
    config_json: &str,
    safetensors: &[u8],
    shared: Option<&Arc<dyn SharedBytes>>,
) -> Result<PeftAdapter, PeftError> {
    let config = AdapterConfig::from_json(config_json)?;
    let st =
        SafeTensors::deserialize(safetensors).map_err(|e| PeftError::Safetensors(e.to_string()))?;
    let mut factors: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
    for (name, view) in st.iter() {
        let (path, factor) = classify(name)?;
        let m = decode(name, &view, shared)?;
        let slot = factors.entry(path.to_string()).or_default();
        match factor {
            Factor::A => slot.0 = Some(m),
            Factor::B => slot.1 = Some(m),
        }
    }
    let mut modules = BTreeMap::new();
    for (path, (a, b)) in factors {
        let a = a.ok_or_else(|| PeftError::MissingFactor {
            module: path.clone(),
            missing: "lora_A",
        })?;
        let b = b.ok_or_else(|| PeftError::MissingFactor {
            module: path.clone(),
            missing: "lora_B",
        })?;
        let expected = config.rank_for(&path);
        if a.rows() != expected {
            return Err(PeftError::RankMismatch {
                module: path,
                expected,
                found: a.rows(),
            });
        }
        if !config.targets(&path) {
            tracing::warn!(module = %path, "adapter has a module its target_modules do not name");
        }
        let scale = config.scale_for(&path);
        let module = LoraModule::new(&path, a, b, scale)?;
        modules.insert(path, module);
    }
    let adapter = LoraAdapter::new(config.r, config.config_scale(), modules);
    Ok(PeftAdapter { config, adapter })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{TensorDtype, encode_safetensors};

    fn tensors(rank: usize) -> Vec<(String, Matrix)> {
        let p = "base_model.model.model.layers.0.self_attn.q_proj";
        vec![
            (
                format!("{p}.lora_A.weight"),
                Matrix::new(rank, 4, vec![0.5; rank * 4]).unwrap(),
            ),
            (
                format!("{p}.lora_B.weight"),
                Matrix::new(6, rank, vec![-0.25; 6 * rank]).unwrap(),
            ),
        ]
    }

    #[test]
    fn reads_f32_and_bf16_with_scales() {
        for dtype in [TensorDtype::F32, TensorDtype::Bf16] {
            let bytes = encode_safetensors(&tensors(2), dtype).unwrap();
            let a = parse_adapter(r#"{"r": 2, "lora_alpha": 8}"#, &bytes).unwrap();
            let m = &a.adapter.modules()["model.layers.0.self_attn.q_proj"];
            assert_eq!((m.rank(), m.in_features(), m.out_features()), (2, 4, 6));
            assert_eq!(m.scale(), 4.0);
            assert_eq!(m.b().data()[0], -0.25);
        }
    }

    #[test]
    fn refuses_bad_inputs() {
        let bytes = encode_safetensors(&tensors(2), TensorDtype::F32).unwrap();
        let err = parse_adapter(r#"{"r": 4}"#, &bytes).unwrap_err();
        assert!(matches!(
            err,
            PeftError::RankMismatch {
                expected: 4,
                found: 2,
                ..
            }
        ));
        let mut only_a = tensors(2);
        only_a.pop();
        let bytes = encode_safetensors(&only_a, TensorDtype::F32).unwrap();
        assert!(matches!(
            parse_adapter(r#"{"r": 2}"#, &bytes).unwrap_err(),
            PeftError::MissingFactor {
                missing: "lora_B",
                ..
            }
        ));
        let emb = vec![(
            "base_model.model.model.embed_tokens.lora_embedding_A".to_string(),
            Matrix::zeros(2, 3),
        )];
        let bytes = encode_safetensors(&emb, TensorDtype::F32).unwrap();
        assert!(matches!(
            parse_adapter("{}", &bytes).unwrap_err(),
            PeftError::Unsupported { .. }
        ));
        let other = vec![(
            "base_model.model.lm_head.weight".to_string(),
            Matrix::zeros(2, 3),
        )];
        let bytes = encode_safetensors(&other, TensorDtype::F32).unwrap();
        assert!(matches!(
            parse_adapter("{}", &bytes).unwrap_err(),
            PeftError::UnexpectedTensor { .. }
        ));
        let mut nan = tensors(2);
        nan[0].1.data_mut()[3] = f32::NAN;
        let bytes = encode_safetensors(&nan, TensorDtype::F32).unwrap();
        assert!(matches!(
            parse_adapter(r#"{"r": 2}"#, &bytes).unwrap_err(),
            PeftError::NonFinite { .. }
        ));
        assert!(matches!(
            parse_adapter("{}", b"garbage").unwrap_err(),
            PeftError::Safetensors(_)
        ));
    }
}
