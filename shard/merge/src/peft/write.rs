//! Writing PEFT adapter directories.

use std::collections::BTreeSet;
use std::path::Path;

use half::bf16;
use serde_json::Value;

use super::config::merged_config_json;
use super::{AdapterConfig, CONFIG_FILE, PeftError, TENSOR_PREFIX, TargetModules, WEIGHTS_FILE};
use crate::adapter::MergedAdapter;
use crate::matrix::Matrix;

/// Storage dtype of written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TensorDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

/// Options of [`write_merged_dir`].
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOptions {
    /// `target_modules` of the written config (see [`merged_target_modules`]).
    pub target_modules: TargetModules,
    /// `base_model_name_or_path` of the written config.
    pub base_model_name_or_path: Option<String>,
    /// Tensor dtype.
    pub dtype: TensorDtype,
}

/// Writes named matrices in the safetensors format to `w`, streaming each tensor's values
/// (no intermediate copy of the data): an 8-byte little-endian header length, the JSON header
/// (tensors by name, `__metadata__ = {"format": "pt"}` as PEFT writes, padded with spaces to a
/// multiple of 8 bytes), then the tensors' bytes in name order.
pub fn write_safetensors<W: std::io::Write>(
    w: &mut W,
    tensors: &[(&str, &Matrix)],
    dtype: TensorDtype,
) -> std::io::Result<()> {
    let mut order: Vec<&(&str, &Matrix)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(b.0));
    let (name, elem) = match dtype {
        TensorDtype::F32 => ("F32", 4usize),
        TensorDtype::Bf16 => ("BF16", 2usize),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (tensor, m) in &order {
        let len = m.rows() * m.cols() * elem;
        header.insert(
            (*tensor).to_string(),
            serde_json::json!({
                "dtype": name,
                "shape": [m.rows(), m.cols()],
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut text = serde_json::to_string(&header).map_err(std::io::Error::other)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    let mut chunk: Vec<u8> = Vec::new();
    for (_, m) in &order {
        match dtype {
            TensorDtype::F32 if cfg!(target_endian = "little") => {
                w.write_all(bytemuck::cast_slice(m.data()))?;
            }
            TensorDtype::F32 => {
                for part in m.data().chunks(1 << 14) {
                    chunk.clear();
                    chunk.extend(part.iter().flat_map(|v| v.to_le_bytes()));
                    w.write_all(&chunk)?;
                }
            }
            TensorDtype::Bf16 => {
                for part in m.data().chunks(1 << 14) {
                    chunk.clear();
                    chunk.extend(
                        part.iter()
                            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()),
                    );
                    w.write_all(&chunk)?;
                }
            }
        }
    }
    Ok(())
}

/// Serializes named matrices to safetensors bytes (see `write_safetensors`).
pub fn encode_safetensors(
    tensors: &[(String, Matrix)],
    dtype: TensorDtype,
) -> Result<Vec<u8>, PeftError> {
    let refs: Vec<(&str, &Matrix)> = tensors.iter().map(|(n, m)| (n.as_str(), m)).collect();
    let mut out = Vec::new();
    write_safetensors(&mut out, &refs, dtype).map_err(|e| PeftError::Safetensors(e.to_string()))?;
    Ok(out)
}

/// Writes `dir/adapter_config.json` (pretty JSON) and `dir/adapter_model.safetensors`, creating
/// `dir` if needed.
pub fn write_adapter_files(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Matrix)],
    dtype: TensorDtype,
) -> Result<(), PeftError> {
    let refs: Vec<(&str, &Matrix)> = tensors.iter().map(|(n, m)| (n.as_str(), m)).collect();
    write_adapter_refs(dir, config, &refs, dtype)
}

/// [`write_adapter_files`] over borrowed matrices.
fn write_adapter_refs(
    dir: &Path,
    config: &Value,
    tensors: &[(&str, &Matrix)],
    dtype: TensorDtype,
) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| PeftError::Config(format!("cannot serialize config: {e}")))?;
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, text).map_err(|e| PeftError::io(&cfg_path, e))?;
    let st_path = dir.join(WEIGHTS_FILE);
    let file = std::fs::File::create(&st_path).map_err(|e| PeftError::io(&st_path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    write_safetensors(&mut w, tensors, dtype)
        .and_then(|()| std::io::Write::flush(&mut w))
        .map_err(|e| PeftError::io(&st_path, e))
}

/// Escapes a module path for use as a PEFT pattern key (a regular expression).
fn escape_key(path: &str) -> String {
    regex::escape(path)
}

/// Writes a merged adapter as a PEFT directory with scale 1: `r = lora_alpha = ` the largest
/// module rank, `rank_pattern = alpha_pattern` for modules of another rank, `use_rslora: false`.
/// A merged scale other than 1 (LoRAX semantics) is folded into `B`.
pub fn write_merged_dir(
    dir: &Path,
    merged: &MergedAdapter,
    opts: &WriteOptions,
) -> Result<(), PeftError> {
    let r = merged.rank();
    let mut rank_pattern = Vec::new();
    let fold = merged.scale as f32;
    // Only a non-unit (LoRAX) scale needs new B matrices; otherwise the factors are written as
    // they are.
    let folded: Vec<Matrix> = if merged.scale == 1.0 {
        Vec::new()
    } else {
        merged
            .modules
            .values()
            .map(|m| {
                Matrix::from_vec(
                    m.b.rows(),
                    m.b.cols(),
                    m.b.data().iter().map(|v| v * fold).collect(),
                )
            })
            .collect()
    };
    let mut names = Vec::with_capacity(2 * merged.modules.len());
    for (path, m) in &merged.modules {
        if m.rank() != r {
            rank_pattern.push((escape_key(path), m.rank()));
        }
        names.push((
            format!("{TENSOR_PREFIX}{path}.lora_A.weight"),
            format!("{TENSOR_PREFIX}{path}.lora_B.weight"),
        ));
    }
    let mut tensors: Vec<(&str, &Matrix)> = Vec::with_capacity(2 * merged.modules.len());
    for (i, ((a_name, b_name), m)) in names.iter().zip(merged.modules.values()).enumerate() {
        tensors.push((a_name, &m.a));
        tensors.push((b_name, folded.get(i).unwrap_or(&m.b)));
    }
    let config = merged_config_json(
        r,
        &rank_pattern,
        &opts.target_modules,
        opts.base_model_name_or_path.as_deref(),
    );
    write_adapter_refs(dir, &config, &tensors, opts.dtype)
}

/// `target_modules` for a merge of adapters with these configs, like PEFT: all lists -> the
/// sorted union; all regexes -> `(re1)|(re2)|...`; otherwise (mixed or absent) the sorted last
/// path segments of the merged modules.
pub fn merged_target_modules<'a>(
    configs: &[&AdapterConfig],
    merged_paths: impl IntoIterator<Item = &'a str>,
) -> TargetModules {
    let lists: Option<Vec<&Vec<String>>> = configs
        .iter()
        .map(|c| match &c.target_modules {
            Some(TargetModules::List(l)) => Some(l),
            _ => None,
        })
        .collect();
    if let Some(lists) = lists.filter(|l| !l.is_empty()) {
        let set: BTreeSet<&String> = lists.into_iter().flatten().collect();
        return TargetModules::List(set.into_iter().cloned().collect());
    }
    let regexes: Option<Vec<&String>> = configs
        .iter()
        .map(|c| match &c.target_modules {
            Some(TargetModules::Regex(r)) => Some(r),
            _ => None,
        })
        .collect();
    if let Some(regexes) = regexes.filter(|r| !r.is_empty()) {
        return TargetModules::Regex(
            regexes
                .iter()
                .map(|r| format!("({r})"))
                .collect::<Vec<_>>()
                .join("|"),
        );
    }
    let names: BTreeSet<String> = merged_paths
        .into_iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    TargetModules::List(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::MergedModule;
    use crate::peft::read_adapter_dir;
    use std::collections::BTreeMap;

    #[test]
    fn merged_round_trip_with_rank_pattern_and_folded_scale() {
        let mut modules = BTreeMap::new();
        let seq = |n: usize, k: f32| (0..n).map(|i| i as f32 * k - 1.0).collect::<Vec<_>>();
        modules.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            MergedModule {
                a: Matrix::new(4, 3, seq(12, 0.1)).unwrap(),
                b: Matrix::new(5, 4, seq(20, 0.05)).unwrap(),
            },
        );
        modules.insert(
            "model.layers.1.self_attn.q_proj".to_string(),
            MergedModule {
                a: Matrix::new(2, 3, seq(6, 0.2)).unwrap(),
                b: Matrix::new(5, 2, seq(10, 0.3)).unwrap(),
            },
        );
        let merged = MergedAdapter {
            scale: 2.0,
            modules,
        };
        let dir = tempfile::tempdir().unwrap();
        let opts = WriteOptions {
            target_modules: TargetModules::List(vec!["q_proj".into()]),
            base_model_name_or_path: Some("tiny".into()),
            dtype: TensorDtype::F32,
        };
        write_merged_dir(dir.path(), &merged, &opts).unwrap();
        let back = read_adapter_dir(dir.path()).unwrap();
        assert_eq!(back.config.r, 4);
        for (path, m) in &merged.modules {
            let got = &back.adapter.modules()[path];
            assert_eq!(got.scale(), 1.0, "{path}: scale 1 everywhere");
            assert_eq!(got.a(), &m.a);
            let want_b: Vec<f32> = m.b.data().iter().map(|v| v * 2.0).collect();
            assert_eq!(got.b().data(), &want_b[..]);
        }
        assert_eq!(back.config.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(back.config.rank_for("model.layers.11.self_attn.q_proj"), 4);
    }

    #[test]
    fn target_module_union() {
        let a = AdapterConfig::from_json(r#"{"target_modules": ["v_proj", "q_proj"]}"#).unwrap();
        let b = AdapterConfig::from_json(r#"{"target_modules": ["k_proj", "q_proj"]}"#).unwrap();
        let c = AdapterConfig::from_json(r#"{"target_modules": ".*q_proj"}"#).unwrap();
        let paths = ["model.layers.0.mlp.up_proj"];
        assert_eq!(
            merged_target_modules(&[&a, &b], paths),
            TargetModules::List(vec!["k_proj".into(), "q_proj".into(), "v_proj".into()])
        );
        assert_eq!(
            merged_target_modules(&[&c, &c], paths),
            TargetModules::Regex("(.*q_proj)|(.*q_proj)".into())
        );
        assert_eq!(
            merged_target_modules(&[&a, &c], paths),
            TargetModules::List(vec!["up_proj".into()])
        );
    }
}
