//! Quantized base weights (`--quantize`): which projections stay in (or are converted to) a GGML
//! block format, and the row operations a quantized tensor allows without dequantizing it.
//!
//! GGML formats quantize each row in blocks of 32 (Q4_0, Q4_1, Q8_0, ...) or 256 (K-quants)
//! consecutive values, so whole rows can be reordered or selected as bytes, and columns can be
//! cut only at block boundaries. Quantized projections of decode steps run through
//! `super::quant_matmul` (Q4_0, Q4_1, Q8_0 with f32 activations) or candle's quantized matmul
//! (the other formats: activations quantized to 8 bits per block, integer dot products); LoRA
//! deltas, norms, attention and the embedding lookup stay in floating point.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;

/// How the base model's projection weights are held at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// `keep` for a GGUF checkpoint on the CPU, `none` otherwise.
    #[default]
    Auto,
    /// Dequantize at load: dense weights in the compute dtype.
    None,
    /// Keep a GGUF file's quantized tensors as stored (float tensors stay dense).
    Keep,
    /// Quantize the dense weights at load to this GGML type.
    To(GgmlDType),
}

/// The GGML types `--quantize` accepts for quantizing at load.
const LOAD_TYPES: [(&str, GgmlDType); 8] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

impl Quantize {
    /// Parses `auto`, `none`, `keep` or a GGML type name (`q8_0`, `q4_k`, ...).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "keep" => Ok(Self::Keep),
            _ => LOAD_TYPES
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, t)| Self::To(*t))
                .ok_or_else(|| {
                    let names: Vec<&str> = LOAD_TYPES.iter().map(|(n, _)| *n).collect();
                    format!(
                        "unknown --quantize `{s}` (auto, none, keep, {})",
                        names.join(", ")
                    )
                }),
        }
    }

    /// The value for `medley-shard --quantize`.
    pub fn as_arg(self) -> String {
        match self {
            Self::Auto => "auto".into(),
            Self::None => "none".into(),
            Self::Keep => "keep".into(),
            Self::To(t) => LOAD_TYPES
                .iter()
                .find(|(_, x)| *x == t)
                .map_or_else(|| format!("{t:?}").to_lowercase(), |(n, _)| n.to_string()),
        }
    }

    /// What `Auto` means for a checkpoint (`gguf`: a GGUF file) on `device`. On the CPU a GGUF
    /// model keeps its quantized weights: decode reads every weight once per token, so 4-8 bit
    /// weights are what make it fast and small there. On a GPU the quantized kernels have not
    /// been checked on a GPU machine yet, so `auto` dequantizes (`keep` can still be asked for).
    pub fn resolve(self, gguf: bool, device: &Device) -> Self {
        match self {
            Self::Auto if gguf && device.is_cpu() => Self::Keep,
            Self::Auto => Self::None,
            other => other,
        }
    }
}

/// Bytes of one row of `cols` values of `dtype`.
fn row_bytes(dtype: GgmlDType, cols: usize) -> usize {
    cols / dtype.block_size() * dtype.type_size()
}

/// A quantized 2-D tensor as raw rows.
pub(crate) struct QRows {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QRows {
    /// The rows of `q` (`[rows, cols]`).
    pub(crate) fn new(q: &QTensor) -> Result<Self, ModelError> {
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data()?.into_owned();
        if data.len() != rows * row_bytes(q.dtype(), cols) {
            return Err(ModelError::Weights(format!(
                "quantized tensor of {rows}x{cols} {:?} holds {} bytes",
                q.dtype(),
                data.len()
            )));
        }
        Ok(Self {
            dtype: q.dtype(),
            rows,
            cols,
            data,
        })
    }

    /// Row `r` of the result is row `order[r]` of `self`.
    pub(crate) fn reorder(self, order: &[usize]) -> Result<Self, ModelError> {
        let rb = row_bytes(self.dtype, self.cols);
        let mut data = Vec::with_capacity(order.len() * rb);
        for &src in order {
            let row = self
                .data
                .get(src * rb..(src + 1) * rb)
                .ok_or_else(|| ModelError::Weights(format!("row {src} out of range")))?;
            data.extend_from_slice(row);
        }
        Ok(Self {
            rows: order.len(),
            data,
            ..self
        })
    }

    /// The rows in `r`.
    pub(crate) fn rows(self, r: Range<usize>) -> Result<Self, ModelError> {
        self.reorder(&r.collect::<Vec<_>>())
    }

    /// The columns in `c`, which must start and end on block boundaries.
    pub(crate) fn cols(self, c: Range<usize>) -> Result<Self, ModelError> {
        let block = self.dtype.block_size();
        if !c.start.is_multiple_of(block)
            || !c.end.is_multiple_of(block)
            || c.end > self.cols
            || c.start > c.end
        {
            return Err(ModelError::Unsupported(format!(
                "columns {c:?} of a {:?} weight: tensor-parallel slices of quantized weights must \
                 cut rows at {block}-value block boundaries (use --quantize none, or fewer shards)",
                self.dtype
            )));
        }
        let (rb, bb) = (row_bytes(self.dtype, self.cols), self.dtype.type_size());
        let (from, to) = (c.start / block * bb, c.end / block * bb);
        let mut data = Vec::with_capacity(self.rows * (to - from));
        for row in self.data.chunks_exact(rb) {
            data.extend_from_slice(&row[from..to]);
        }
        Ok(Self {
            cols: c.len(),
            data,
            ..self
        })
    }

    /// The tensor on `device`.
    pub(crate) fn into_qtensor(self, device: &Device) -> Result<QTensor, ModelError> {
        let storage = QStorage::from_data(Cow::Owned(self.data), device, self.dtype)?;
        Ok(QTensor::new(storage, (self.rows, self.cols))?)
    }
}

/// Quantizes the dense weight `w` (`[out, in]`) to `dtype`, or `None` when its rows do not split
/// into whole blocks (such a weight stays dense, as llama.cpp keeps it in a float type).
pub(crate) fn quantize_weight(w: &Tensor, dtype: GgmlDType) -> Result<Option<QTensor>, ModelError> {
    let (_, cols) = w.dims2()?;
    if !cols.is_multiple_of(dtype.block_size()) {
        return Ok(None);
    }
    let w32 = w
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?;
    let q = QTensor::quantize(&w32, dtype)?;
    if w.device().is_cpu() {
        return Ok(Some(q));
    }
    Ok(Some(QRows::new(&q)?.into_qtensor(w.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        for s in ["auto", "none", "keep", "q8_0", "q4_k", "Q4_1"] {
            let q = Quantize::parse(s).unwrap();
            assert_eq!(q.as_arg(), s.to_lowercase());
        }
        let err = Quantize::parse("q3").unwrap_err();
        assert!(err.contains("q8_0") && err.contains("keep"), "{err}");
        let cpu = Device::Cpu;
        assert_eq!(Quantize::Auto.resolve(true, &cpu), Quantize::Keep);
        assert_eq!(Quantize::Auto.resolve(false, &cpu), Quantize::None);
        assert_eq!(Quantize::Keep.resolve(false, &cpu), Quantize::Keep);
    }

    fn sample(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Row and block-aligned column selections of the quantized bytes dequantize to the same
    /// values as the same selections of the dequantized tensor.
    #[test]
    fn row_and_column_parts_commute_with_dequantization() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K] {
            let cols = 2 * dtype.block_size();
            let q = QTensor::quantize(&sample(6, cols), dtype).unwrap();
            let full = q.dequantize(&dev).unwrap();
            let order = [5, 0, 3, 3, 1];
            let picked = QRows::new(&q)
                .unwrap()
                .reorder(&order)
                .unwrap()
                .into_qtensor(&dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            let ids = Tensor::new(&[5u32, 0, 3, 3, 1], &dev).unwrap();
            assert_eq!(
                picked.to_vec2::<f32>().unwrap(),
                full.index_select(&ids, 0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            );
            let b = dtype.block_size();
            let right = QRows::new(&q)
                .unwrap()
                .cols(b..2 * b)
                .unwrap()
                .into_qtensor(&dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            assert_eq!(
                right.to_vec2::<f32>().unwrap(),
                full.narrow(1, b, b).unwrap().to_vec2::<f32>().unwrap()
            );
            let err = QRows::new(&q).unwrap().cols(1..b).err().unwrap();
            assert!(err.to_string().contains("block boundaries"), "{err}");
        }
    }

    #[test]
    fn weights_with_partial_blocks_stay_dense() {
        assert!(
            quantize_weight(&sample(4, 48), GgmlDType::Q8_0)
                .unwrap()
                .is_none()
        );
        let q = quantize_weight(&sample(4, 64), GgmlDType::Q8_0)
            .unwrap()
            .unwrap();
        assert_eq!(q.dtype(), GgmlDType::Q8_0);
    }
}
