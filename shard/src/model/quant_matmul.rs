//! Decode-step products with kept GGML blocks: Q4_0, Q4_1 and Q8_0 weights on the CPU go
//! through `medley_kernels::qmatmul`, which meets each block's levels with the activations
//! rounded to 16 bits per block (1 to 3 rows) or in f32 (more rows). candle's quantized matmul
//! rounds the activations to 8 bits per block, which moved SmolLM2-135M Q4_1's answers away from
//! the dequantized model's. Other formats (the K-quants) keep candle's kernel.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use medley_kernels::Shape as KernelShape;
use medley_kernels::qmatmul::{QFormat, qmatmul_nt};

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

/// `x Wᵀ` for `x: [rows, in]` and the blocks of `w: [out, in]`, when the kernel serves them (a
/// CPU tensor of a [`format`] with whole blocks per row); `None` otherwise.
pub(crate) fn forward(w: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(fmt) = format(w.dtype()) else {
        return Ok(None);
    };
    if !w.device().is_cpu() || !x.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k || k % medley_kernels::qmatmul::BLOCK != 0 {
        return Ok(None);
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let data = w.data()?;
    let mut y = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let shape = KernelShape {
            rows: m,
            in_features: k,
            out_features: n,
        };
        qmatmul_nt(shape, cpu_f32_slice(cpu, layout)?, &data, fmt, &mut y)
            .map_err(|e| candle_core::Error::Msg(format!("quantized matmul: {e}")))?;
    }
    Ok(Some(Tensor::from_vec(y, (m, n), &Device::Cpu)?))
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
            let got = forward(&q, &x).unwrap().expect("served");
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
        let x = Tensor::randn(0f32, 1.0, (5, 256), &dev).unwrap();
        let k = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        assert!(forward(&k, &x).unwrap().is_none());
    }
}
