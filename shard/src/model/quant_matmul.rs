//! Decode-step products with kept GGML blocks: Q4_0, Q4_1 and Q8_0 weights on the CPU are
//! repacked at load ([`Packed`], 4 rows interleaved block by block) and go through
//! `medley_kernels::qmatmul`, which meets each block's levels with the activations rounded to 16
//! bits per block (1 to 3 rows) or in f32 (more rows). candle's quantized matmul rounds the
//! activations to 8 bits per block, which moved SmolLM2-135M Q4_1's answers away from the
//! dequantized model's. Other formats (the K-quants) keep candle's kernel.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use medley_kernels::Shape as KernelShape;
use medley_kernels::qmatmul::{Packed, QFormat, qmatmul_nt};

use super::layers::cpu_f32_slice;

/// The kernel's format for a GGML dtype, if it has one.
pub(crate) fn format(dtype: GgmlDType) -> Option<QFormat> {
    match dtype {
        GgmlDType::Q4_0 => Some(QFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QFormat::Q4_1),
        GgmlDType::Q8_0 => Some(QFormat::Q8_0),
        _ => None,
    }
}

/// The blocks of `q` (`[out, in]`) repacked for the kernel, when it serves them: a CPU tensor
/// of a [`format`] with whole blocks per row. `None` otherwise (the K-quants, CUDA).
pub(crate) fn pack(q: &QTensor) -> candle_core::Result<Option<Packed>> {
    let Some(fmt) = format(q.dtype()) else {
        return Ok(None);
    };
    if !q.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = q.shape().dims2()?;
    if !k.is_multiple_of(medley_kernels::qmatmul::BLOCK) {
        return Ok(None);
    }
    Packed::new(fmt, n, k, &q.data()?)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(format!("repacking quantized blocks: {e}")))
}

/// `x Wᵀ` for `x: [rows, in]` (CPU) and the packed `w: [out, in]`, as `[rows, out]` f32.
pub(crate) fn forward(w: &Packed, x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, k) = (w.rows(), w.cols());
    let (m, _) = x.dims2()?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("kept quantized weights multiply CPU activations only");
        };
        let shape = KernelShape {
            rows: m,
            in_features: k,
            out_features: n,
        };
        qmatmul_nt(shape, cpu_f32_slice(cpu, layout)?, w, &mut y)
            .map_err(|e| candle_core::Error::Msg(format!("quantized matmul: {e}")))?;
    }
    Tensor::from_vec(y, (m, n), &Device::Cpu)
}

/// The whole of `w` dequantized (`[out, in]` f32 on the CPU), for products of many rows.
pub(crate) fn dequantize(w: &Packed) -> candle_core::Result<Tensor> {
    Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest absolute value of a tensor.
    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Kept blocks times f32 activations equal the dequantized weight's product, for every
    /// format the kernel serves, on its direct (1 row) and dense (5 rows) paths: up to f32
    /// rounding (1e-5 of the largest output), plus on the direct path the kernel's rounding of
    /// `x` to 16-bit levels per block (at most `max|x| / 65534` per value, so `max|x| Σ|w| /
    /// 65534` per output). K-quants are left to candle.
    #[test]
    fn kept_blocks_multiply_like_the_dequantized_weight() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (48, 256), &dev).unwrap();
        for (rows, dtype) in [1, 5]
            .into_iter()
            .flat_map(|r| [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0].map(|d| (r, d)))
        {
            let x = Tensor::randn(0f32, 1.0, (rows, 256), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let wd = q.dequantize(&dev).unwrap();
            let packed = pack(&q).unwrap().expect("served");
            assert_eq!(
                dequantize(&packed).unwrap().to_vec2::<f32>().unwrap(),
                wd.to_vec2::<f32>().unwrap(),
                "{dtype:?}: the packed blocks dequantize as candle's"
            );
            let got = forward(&packed, &x).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let diff = max_abs(&(got - &want).unwrap());
            let peak = max_abs(&want);
            let w_l1 = max_abs(&wd.abs().unwrap().sum(1).unwrap());
            let rounding = if rows == 1 {
                max_abs(&x) * w_l1 / 65534.0
            } else {
                0.0
            };
            assert!(
                diff <= 1e-5 * peak + rounding,
                "{dtype:?} {rows}: {diff} vs peak {peak} (rounding bound {rounding})"
            );
        }
        let k = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(pack(&k).unwrap().is_none());
    }
}
