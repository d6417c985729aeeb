//! The token embedding matrix: dense, or, for a GGUF file whose embedding is Q4_0, Q4_1 or Q8_0
//! and kept quantized on the CPU, the file's blocks (repacked for the kernels, and shared with a
//! tied `lm_head`), of which a lookup dequantizes only the rows it reads (the same values a full
//! dequantization gives). A kept embedding is what lets a 4-bit model stay at about a quarter of
//! its f32 memory: TinyLlama's f32 embedding alone is 250 MiB.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use medley_kernels::qmatmul::Packed;

use super::ModelError;
use super::quant::Quantize;
use super::weights::{Checkpoint, Part};

/// `[vocab rows, hidden]`, dense or kept as blocks.
#[derive(Debug)]
pub(crate) enum Embedding {
    /// In the compute dtype on the model's device.
    Dense(Tensor),
    /// A GGUF file's blocks on the CPU.
    Kept(Box<Kept>),
}

/// A kept embedding's blocks; looked-up rows come out in `dtype`.
#[derive(Debug)]
pub(crate) struct Kept {
    w: Arc<Packed>,
    dtype: DType,
    /// The CPU (where the rows are made).
    device: Device,
}

/// What [`Embedding::load`] reads.
pub(crate) struct EmbeddingSpec<'a> {
    pub ckpt: &'a Checkpoint,
    pub shape: [usize; 2],
    pub part: Part,
    pub dtype: DType,
    pub device: &'a Device,
    pub quantize: Quantize,
}

impl Embedding {
    /// `model.embed_tokens.weight` (this rank's vocabulary rows): kept when `quantize` is
    /// `keep`, the device is the CPU and the file stores a format the kernels decode.
    pub(crate) fn load(spec: EmbeddingSpec<'_>) -> Result<Self, ModelError> {
        let name = "model.embed_tokens.weight";
        if spec.quantize == Quantize::Keep
            && spec.device.is_cpu()
            && let Some(w) =
                spec.ckpt
                    .qtensor_part(name, &spec.shape, spec.part.clone(), spec.device)?
            && let Some(w) = super::quant_matmul::pack(&w)?
        {
            return Ok(Self::Kept(Box::new(Kept {
                w: Arc::new(w),
                dtype: spec.dtype,
                device: Device::Cpu,
            })));
        }
        let t = spec
            .ckpt
            .tensor_part(name, &spec.shape, spec.part, spec.dtype, spec.device)?;
        Ok(Self::Dense(t))
    }

    /// The dense matrix (a tied `lm_head` that is not kept quantized); `None` when kept.
    pub(crate) fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Kept(_) => None,
        }
    }

    /// The kept blocks (a tied `lm_head` multiplies by them); `None` when dense.
    pub(crate) fn packed(&self) -> Option<&Arc<Packed>> {
        match self {
            Self::Dense(_) => None,
            Self::Kept(k) => Some(&k.w),
        }
    }

    /// The dtype of looked-up rows.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Kept(k) => k.dtype,
        }
    }

    /// Where looked-up rows live.
    pub(crate) fn device(&self) -> &Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Kept(k) => &k.device,
        }
    }

    /// `[ids.len(), hidden]`: row `i` is row `ids[i]` of the matrix (local row indices).
    pub(crate) fn rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let (w, dtype) = match self {
            Self::Dense(t) => {
                return t.index_select(&Tensor::from_slice(ids, ids.len(), t.device())?, 0);
            }
            Self::Kept(k) => (&k.w, k.dtype),
        };
        let hidden = w.cols();
        let mut out = vec![0f32; ids.len() * hidden];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            w.dequantize_row(id as usize, dst).map_err(|e| {
                candle_core::Error::Msg(format!("embedding lookup of token id {id}: {e}"))
            })?;
        }
        Tensor::from_vec(out, (ids.len(), hidden), &Device::Cpu)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    /// Kept rows equal the rows of candle's full dequantization, in the requested order; an id
    /// past the last row is an error, not a panic.
    #[test]
    fn kept_rows_equal_the_dequantized_matrix() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (40, 64), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let full = q.dequantize(&dev).unwrap();
            let e = Embedding::Kept(Box::new(Kept {
                w: Arc::new(super::super::quant_matmul::pack(&q).unwrap().unwrap()),
                dtype: DType::F32,
                device: Device::Cpu,
            }));
            let ids = [39u32, 0, 7, 7];
            let got = e.rows(&ids).unwrap();
            let want = full
                .index_select(&Tensor::from_slice(&ids, 4, &dev).unwrap(), 0)
                .unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 1e-6, "{dtype:?}: {diff}");
            assert!(e.rows(&[40]).is_err());
        }
    }
}
