//! Weights of a GGUF file under their Hugging Face names: `model.layers.3.self_attn.q_proj.weight`
//! is read from `blk.3.attn_q.weight`, dequantized to f32 by candle's GGUF reader, and the rows
//! of `attn_q` / `attn_k` are put back in Hugging Face order (llama.cpp's converter interleaves
//! the two rotary halves of every head; transformers' GGUF loader undoes the same permutation).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use medley_hub::gguf::GgufMetadata;

use super::ModelError;
use super::quant::QRows;
use super::weights::Part;

/// An opened GGUF file.
pub(super) struct GgufCheckpoint {
    path: PathBuf,
    meta: GgufMetadata,
    reader: Mutex<BufReader<std::fs::File>>,
    heads: usize,
    kv_heads: usize,
}

impl GgufCheckpoint {
    /// Reads the metadata and tensor list of `path`.
    pub(super) fn open(path: &Path) -> Result<Self, ModelError> {
        let gguf = |e: medley_hub::gguf::GgufError| ModelError::Weights(e.to_string());
        let meta = GgufMetadata::read(path).map_err(gguf)?;
        let (heads, kv_heads) = meta.head_counts().map_err(gguf)?;
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            meta,
            reader: Mutex::new(BufReader::new(file)),
            heads,
            kv_heads,
        })
    }

    /// The file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds the tensor with Hugging Face name `name`.
    pub(super) fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|(n, _)| self.meta.has_tensor(&n))
    }

    /// `part` of tensor `name` (whole shape `shape`, Hugging Face layout), dequantized and
    /// converted to `dtype` on `device`.
    pub(super) fn tensor_part(
        &self,
        name: &str,
        shape: &[usize],
        part: Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let (q, rotary) = self.read(name, shape)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(which) = rotary {
            t = reorder_rows(&t, &rotary_order(shape[0], self.heads_of(which), true)?)?;
        }
        let t = match part {
            Part::Whole => t,
            Part::Rows(r) if r.start <= r.end && r.end <= shape[0] => {
                t.narrow(0, r.start, r.len())?
            }
            Part::Cols(c) if shape.len() == 2 && c.start <= c.end && c.end <= shape[1] => {
                t.narrow(1, c.start, c.len())?
            }
            part => {
                return Err(ModelError::Weights(format!(
                    "`{name}` of shape {shape:?} has no part {part:?}"
                )));
            }
        };
        Ok(t.contiguous()?.to_dtype(dtype)?.to_device(device)?)
    }

    /// `part` of the 2-D tensor `name` in the quantized type the file stores it in (rows put in
    /// Hugging Face order and selected as bytes), on `device`; `None` when the file stores it
    /// as floats (read those with [`Self::tensor_part`]).
    pub(super) fn qtensor_part(
        &self,
        name: &str,
        shape: &[usize],
        part: Part,
        device: &Device,
    ) -> Result<Option<QTensor>, ModelError> {
        let (q, rotary) = self.read(name, shape)?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        let mut rows = QRows::new(&q)?;
        if let Some(which) = rotary {
            rows = rows.reorder(&rotary_order(shape[0], self.heads_of(which), true)?)?;
        }
        let rows = match part {
            Part::Whole => rows,
            Part::Rows(r) => rows.rows(r)?,
            Part::Cols(c) => rows.cols(c)?,
        };
        Ok(Some(rows.into_qtensor(device)?))
    }

    /// Tensor `name` as stored (checked against `shape`) and whether its rows are rotary.
    fn read(&self, name: &str, shape: &[usize]) -> Result<(QTensor, Option<Rotary>), ModelError> {
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let (gguf, rotary) = gguf_name(name).ok_or_else(missing)?;
        let actual = self.meta.tensor_shape(&gguf).ok_or_else(missing)?;
        if actual != shape {
            return Err(ModelError::WrongShape {
                name: format!("{name} (`{gguf}` in the GGUF file)"),
                expected: shape.to_vec(),
                actual,
            });
        }
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| ModelError::Weights("GGUF reader poisoned".into()))?;
        let q = self
            .meta
            .content()
            .tensor(&mut *reader, &gguf, &Device::Cpu)
            .map_err(|e| ModelError::Weights(format!("reading `{gguf}`: {e}")))?;
        Ok((q, rotary))
    }

    fn heads_of(&self, which: Rotary) -> usize {
        match which {
            Rotary::Query => self.heads,
            Rotary::Key => self.kv_heads,
        }
    }
}

/// Which rotary projection a tensor is (its heads decide the permutation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rotary {
    /// `q_proj` (attention heads).
    Query,
    /// `k_proj` (key/value heads).
    Key,
}

/// The GGUF name of Hugging Face tensor `name`, and whether its rows are rotary-permuted.
pub(crate) fn gguf_name(name: &str) -> Option<(String, Option<Rotary>)> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), None));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let (gguf, rotary) = match module {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(Rotary::Query)),
        "self_attn.k_proj" => ("attn_k", Some(Rotary::Key)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{gguf}.{suffix}"), rotary))
}

/// Row `r` of the result is row `order[r]` of `t` (a [`rotary_order`] applied to a dense weight).
pub(crate) fn reorder_rows(t: &Tensor, order: &[usize]) -> Result<Tensor, ModelError> {
    let ids: Vec<u32> = order.iter().map(|&i| i as u32).collect();
    let ids = Tensor::new(ids.as_slice(), t.device())?;
    Ok(t.index_select(&ids, 0)?)
}

/// The row order between llama.cpp's rotary layout and Hugging Face's, for a weight of `rows`
/// rows over `heads` heads. Within a head of `d` rows, stored row `2 i + j` is Hugging Face row
/// `j d / 2 + i` (llama.cpp's converter interleaves the two rotary halves). With `to_hf`, row
/// `r` of the Hugging Face weight is stored row `order[r]` (what loading applies); otherwise row
/// `s` of the stored weight is Hugging Face row `order[s]` (what writing a GGUF file applies).
pub(crate) fn rotary_order(
    rows: usize,
    heads: usize,
    to_hf: bool,
) -> Result<Vec<usize>, ModelError> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(ModelError::Weights(format!(
            "{rows} rows cannot be split into {heads} rotary heads"
        )));
    }
    let d = rows / heads;
    let half = d / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, rem) = (r / d, r % d);
            if to_hf {
                let (j, i) = (rem / half, rem % half);
                h * d + i * 2 + j
            } else {
                let (i, j) = (rem / 2, rem % 2);
                h * d + j * half + i
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight"),
            Some(("blk.12.attn_k.weight".into(), Some(Rotary::Key)))
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight"),
            Some(("blk.0.ffn_down.weight".into(), None))
        );
        assert_eq!(
            gguf_name("lm_head.weight"),
            Some(("output.weight".into(), None))
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.other.weight"), None);
    }

    /// Both orders against llama.cpp's `permute` (convert_hf_to_gguf.py) written out by hand.
    #[test]
    fn rotary_orders_match_llama_cpp_permute() {
        let (heads, head_dim, cols) = (3usize, 8usize, 2usize);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        // llama.cpp: w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2)
        let mut stored = vec![0f32; rows * cols];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = h * head_dim + j * head_dim / 2 + i;
                    let dst = h * head_dim + i * 2 + j;
                    stored[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let gather = |v: &[f32], order: &[usize]| -> Vec<f32> {
            order
                .iter()
                .flat_map(|&r| v[r * cols..(r + 1) * cols].to_vec())
                .collect()
        };
        let to_hf = rotary_order(rows, heads, true).unwrap();
        assert_eq!(gather(&stored, &to_hf), hf);
        let to_stored = rotary_order(rows, heads, false).unwrap();
        assert_eq!(gather(&hf, &to_stored), stored);
        assert!(rotary_order(rows, 5, true).is_err());
    }
}
