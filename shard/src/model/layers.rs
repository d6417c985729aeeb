//! Building blocks of the decoder: linear projections, RMSNorm and the gated MLP, with the
//! numerics of transformers (normalisation and activation math in f32, results rounded to the
//! compute dtype).
//!
//! candle's CPU matmul has no bf16 kernel, so on the CPU a bf16 model keeps its projection
//! weights in f32 (an exact widening of the bf16 checkpoint values) and rounds every matmul result
//! back to bf16. That is what PyTorch's bf16 CPU gemm computes too (f32 accumulation, one rounding
//! of the output); it costs twice the weight memory of a native bf16 kernel. On CUDA the weights
//! stay in bf16.

use candle_core::{DType, Device, Tensor};

/// The dtype matmuls run in for activations of `compute` dtype on `device`.
pub fn matmul_dtype(device: &Device, compute: DType) -> DType {
    if device.is_cpu() && compute == DType::BF16 {
        DType::F32
    } else {
        compute
    }
}

/// `a @ b` computed in the matmul dtype for `out` on the device of `a`, returned in `out`.
pub fn matmul_in(a: &Tensor, b: &Tensor, out: DType) -> candle_core::Result<Tensor> {
    let mm = matmul_dtype(a.device(), out);
    a.to_dtype(mm)?.matmul(&b.to_dtype(mm)?)?.to_dtype(out)
}

/// Up to this many rows, CPU projections are computed as `(W xᵀ)ᵀ` (see `Linear::matmul`);
/// measured with candle 0.11 on 2 cores for W = 5632x2048: 1 row 3.3 ms either way, 4 rows
/// 17.7 vs 9.1 ms, 16 rows 29.6 vs 9.0 ms, 32 rows 18.5 vs 13.2 ms, 64 rows about equal, 256+
/// rows slower.
const SMALL_BATCH_ROWS: usize = 32;

/// A bias-free linear layer `y = x Wᵀ` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    compute: DType,
}

impl Linear {
    /// Wraps `weight` (`[out, in]`, any float dtype) for inputs of dtype `compute`.
    pub fn new(weight: Tensor, compute: DType) -> candle_core::Result<Self> {
        let weight = weight.to_dtype(matmul_dtype(weight.device(), compute))?;
        Ok(Self { weight, compute })
    }

    /// The weight in its matmul dtype.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x: [rows, in]` → `[rows, out]` in the compute dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.matmul(x)?.to_dtype(self.compute)
    }

    /// Like [`Linear::forward`] but returns f32 (for logits): the result is rounded to the
    /// compute dtype first, like transformers' `lm_head`, then widened.
    pub fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.matmul(x)?.to_dtype(self.compute)?.to_dtype(DType::F32)
    }

    /// `x Wᵀ` in the matmul dtype, contiguous.
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?;
        let rows = x.dim(0)?;
        if self.weight.device().is_cpu() && rows > 1 && rows <= SMALL_BATCH_ROWS {
            // The CPU gemm packs the transposed weight when the left side has a few rows, which
            // made batched decode steps 2-3x slower than one row; `(W xᵀ)ᵀ` streams W as it is.
            self.weight.matmul(&x.t()?)?.t()?.contiguous()
        } else {
            x.matmul(&self.weight.t()?)
        }
    }
}

/// Root-mean-square normalisation over the last dimension, as transformers' `LlamaRMSNorm`:
/// `weight * to_dtype(x_f32 * rsqrt(mean(x_f32²) + eps))`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// f32 ones used to normalise half-precision inputs in f32 with candle's fused kernel.
    ones: Option<Tensor>,
    eps: f32,
}

impl RmsNorm {
    /// `weight: [hidden]` in the compute dtype.
    pub fn new(weight: Tensor, eps: f64) -> candle_core::Result<Self> {
        let ones = if weight.dtype() == DType::F32 {
            None
        } else {
            Some(Tensor::ones(weight.dims1()?, DType::F32, weight.device())?)
        };
        Ok(Self {
            weight,
            ones,
            eps: eps as f32,
        })
    }

    /// Normalises `x: [rows, hidden]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.ones {
            None => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
            Some(ones) => {
                let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, ones, self.eps)?;
                normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
            }
        }
    }
}

/// `silu(x)` evaluated in f32 and rounded once to the dtype of `x` (PyTorch's half-precision
/// activations upcast internally the same way).
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        x.silu()
    } else {
        x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RMSNorm against a direct f64 evaluation of the formula; f32 rounding of the fused kernel
    /// (sum of squares, one sqrt, one division) stays within a few ulps, hence 1e-6 relative.
    #[test]
    fn rms_norm_matches_formula() {
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.37).collect();
        let w: Vec<f32> = (0..6).map(|i| 1.0 + i as f32 * 0.1).collect();
        let x = Tensor::from_vec(xs.clone(), (2, 6), &dev).unwrap();
        let norm = RmsNorm::new(Tensor::from_vec(w.clone(), 6, &dev).unwrap(), 1e-5).unwrap();
        let got = norm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for r in 0..2 {
            let row = &xs[r * 6..r * 6 + 6];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 6.0;
            for c in 0..6 {
                let want = row[c] as f64 / (ms + 1e-5).sqrt() * w[c] as f64;
                assert!((got[r][c] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
        }
        // bf16: the f32 result rounded to bf16 then scaled in bf16 (two roundings, <= 2^-7 rel).
        let nb = RmsNorm::new(
            Tensor::from_vec(w, 6, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
            1e-5,
        )
        .unwrap();
        let gb = nb
            .forward(&x.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..2 {
            for c in 0..6 {
                assert!((gb[r][c] - got[r][c]).abs() <= 2f32.powi(-6) * got[r][c].abs().max(1.0));
            }
        }
    }

    #[test]
    fn bf16_linear_on_cpu_runs_in_f32() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (3, 2), &dev).unwrap();
        let lin = Linear::new(w.to_dtype(DType::BF16).unwrap(), DType::BF16).unwrap();
        assert_eq!(lin.weight().dtype(), DType::F32);
        let x = Tensor::from_vec(vec![1f32, -1.], (1, 2), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(
            y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![-1f32, -1., -1.]]
        );
    }
}
