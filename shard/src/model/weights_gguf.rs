//! Weights of a GGUF file under their Hugging Face names: `model.layers.3.self_attn.q_proj.weight`
//! is read from `blk.3.attn_q.weight`, dequantized to f32 by candle's GGUF reader, and the rows
//! of `attn_q` / `attn_k` are put back in Hugging Face order (llama.cpp's converter interleaves
//! the two rotary halves of every head; transformers' GGUF loader undoes the same permutation).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use medley_hub::gguf::GgufMetadata;

use super::ModelError;
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
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
        };
        let (gguf, permute) = gguf_name(name).ok_or_else(missing)?;
        let actual = self.meta.tensor_shape(&gguf).ok_or_else(missing)?;
        if actual != shape {
            return Err(ModelError::WrongShape {
                name: format!("{name} (`{gguf}` in the GGUF file)"),
                expected: shape.to_vec(),
                actual,
            });
        }
        let q = {
            let mut reader = self
                .reader
                .lock()
                .map_err(|_| ModelError::Weights("GGUF reader poisoned".into()))?;
            self.meta
                .content()
                .tensor(&mut *reader, &gguf, &Device::Cpu)
                .map_err(|e| ModelError::Weights(format!("reading `{gguf}`: {e}")))?
        };
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(which) = permute {
            let heads = match which {
                Rotary::Query => self.heads,
                Rotary::Key => self.kv_heads,
            };
            t = unpermute_rows(&t, heads)?;
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

/// Undoes llama.cpp's rotary permutation of the rows of a `[heads * head_dim, ...]` weight: within
/// each head, stored row `2 i + j` is Hugging Face row `j * head_dim / 2 + i`.
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    // [heads, half, 2, rest...] -> [heads, 2, half, rest...]
    swap_rotary_axes(t, heads, true)
}

/// llama.cpp's permutation (`convert_hf_to_gguf.py`'s `permute`), the inverse of
/// [`unpermute_rows`]: used to write GGUF fixtures.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    // [heads, 2, half, rest...] -> [heads, half, 2, rest...]
    swap_rotary_axes(t, heads, false)
}

/// Views the rows of `t` as `[heads, a, b]` (`a = half, b = 2` when `stored`, else `a = 2,
/// b = half`) and swaps the last two of those axes.
fn swap_rotary_axes(t: &Tensor, heads: usize, stored: bool) -> Result<Tensor, ModelError> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(ModelError::Weights(format!(
            "{rows} rows cannot be split into {heads} rotary heads"
        )));
    }
    let half = rows / heads / 2;
    let mut shape = if stored {
        vec![heads, half, 2]
    } else {
        vec![heads, 2, half]
    };
    shape.extend_from_slice(&dims[1..]);
    Ok(t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
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

    /// llama.cpp's `permute` (convert_hf_to_gguf.py) followed by ours is the identity, and ours
    /// moves rows exactly as transformers' `reverse_permute_weights`.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
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
        let t = Tensor::from_vec(stored, (rows, cols), &Device::Cpu).unwrap();
        let back = unpermute_rows(&t, heads).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
        let hf_t = Tensor::from_vec(hf.clone(), (rows, cols), &Device::Cpu).unwrap();
        let again = permute_rows(&hf_t, heads).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(unpermute_rows(&t, 5).is_err());
    }
}
