//! Building blocks of the decoder: linear projections, RMSNorm and the gated MLP, with the
//! numerics of transformers (normalisation and activation math in f32, results rounded to the
//! compute dtype).
//!
//! candle's CPU matmul has no bf16 kernel, so on the CPU a bf16 model keeps its projection
//! weights in f32 (an exact widening of the bf16 checkpoint values) and rounds every matmul result
//! back to bf16. That is what PyTorch's bf16 CPU gemm computes too (f32 accumulation, one rounding
//! of the output); it costs twice the weight memory of a native bf16 kernel. On CUDA the weights
//! stay in bf16.
//!
//! CPU projections of f32 models run through `medley_kernels::matmul`: decode steps and small
//! prefills stream the weight once per call instead of letting a gemm pack it (see
//! `KERNEL_MAX_ROWS` for the measurements), and prefill chunks of
//! `medley_kernels::matmul::Isa::packed_min_rows` rows or more run its packed AVX-512 / AVX2 gemm,
//! which beats candle's on these shapes (see `kernels/benches/matmul.rs`). Without AVX2 only the
//! first case uses the kernel.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Shape, Tensor};
use medley_kernels::Shape as KernelShape;
use medley_kernels::matmul::{Isa, matmul_nt};
use medley_kernels::qmatmul::Packed;

use super::lora::{LoraDelta, RowSlots, TargetModule};

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

/// Up to this many rows, CPU projections of f32 models use `medley_kernels::matmul` even
/// without AVX2 (with AVX2 they always do).
///
/// Half-precision models keep candle's matmul (on f32-widened weights): the kernel sums each dot
/// product in a different order (16 strided lanes, then a tree) than candle's gemm, and although
/// both are within f32 rounding of the exact sum, a changed order moves some outputs across a
/// bf16 rounding boundary. The bf16 transformers goldens (`tests/forward_goldens.rs`) allow one
/// bf16 step of each logit plus 0.01 and fail with the kernel (max error 6.25e-2 on the fixture).
/// Measured on 2 cores (AMD EPYC, AVX-512; `cargo bench -p medley-kernels --bench matmul`), against
/// the better of candle 0.11's `x Wᵀ` and `(W xᵀ)ᵀ`: for the TinyLlama shapes the kernel is ahead
/// from 1 row (bandwidth-bound, 30+ vs 20-25 GB/s) through 64 rows (about 160 vs 110-150
/// GFLOP/s); past that candle's packed gemm keeps the weight panels in cache across many more
/// rows and wins.
const KERNEL_MAX_ROWS: usize = 64;

/// Up to this many rows, CPU projections that do not use the kernel (half-precision models) are
/// computed as `(W xᵀ)ᵀ`; measured with candle 0.11 on 2 cores for W = 5632x2048 in f32: 1 row 3.3 ms
/// either way, 4 rows 17.7 vs 9.1 ms, 16 rows 29.6 vs 9.0 ms, 32 rows 18.5 vs 13.2 ms, 64 rows
/// about equal, 256+ rows slower.
const SMALL_BATCH_ROWS: usize = 32;

/// Above this many rows (prefill chunks) a quantized projection is dequantized for the call and
/// multiplied like a dense one: the product is then exactly the dequantized model's, and a
/// prompt's compute amortises the dequantization. Decode steps (up to this many rows) read the
/// blocks as they are, which is where quantization pays: they are bound by the bytes of weight
/// read per token. Q4_0, Q4_1 and Q8_0 then multiply in f32 (`super::quant_matmul`), the
/// K-quants through candle's kernel (activations rounded to 8 bits per block).
const QUANTIZED_MAX_ROWS: usize = KERNEL_MAX_ROWS;

/// A bias-free linear layer `y = x Wᵀ` with `W: [out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    compute: DType,
}

#[derive(Debug, Clone)]
enum Weight {
    /// In the matmul dtype, contiguous.
    Dense(Tensor),
    /// A GGML block format, multiplied by candle's quantized matmul (f32 activations).
    Quantized(QMatMul),
    /// Q4_0 / Q4_1 / Q8_0 blocks on the CPU, repacked for `medley_kernels::qmatmul` (shared
    /// with a tied embedding).
    Packed(Arc<Packed>),
}

impl Linear {
    /// Wraps `weight` (`[out, in]`, any float dtype) for inputs of dtype `compute`.
    pub fn new(weight: Tensor, compute: DType) -> candle_core::Result<Self> {
        // Contiguous, so the CPU kernel can read it in place.
        let weight = weight
            .to_dtype(matmul_dtype(weight.device(), compute))?
            .contiguous()?;
        Ok(Self {
            weight: Weight::Dense(weight),
            compute,
        })
    }

    /// Wraps the quantized weight `q` (`[out, in]`) for inputs of dtype `compute`; float GGML
    /// types are dequantized into a dense layer.
    pub fn quantized(q: QTensor, compute: DType) -> candle_core::Result<Self> {
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let device = q.device();
            return Self::new(q.dequantize(&device)?, compute);
        }
        if let Some(p) = super::quant_matmul::pack(&q)? {
            return Ok(Self::packed(Arc::new(p), compute));
        }
        Ok(Self {
            weight: Weight::Quantized(QMatMul::from_qtensor(q)?),
            compute,
        })
    }

    /// Wraps repacked blocks (`[out, in]`, on the CPU) for inputs of dtype `compute`.
    pub(crate) fn packed(w: Arc<Packed>, compute: DType) -> Self {
        Self {
            weight: Weight::Packed(w),
            compute,
        }
    }

    /// The dense weight in its matmul dtype (`None` when quantized).
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) | Weight::Packed(_) => None,
        }
    }

    /// Bytes the weight takes in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Packed(p) => p.bytes(),
            Weight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.elem_count() * w.dtype().size_in_bytes()
            }
        }
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

    /// `x Wᵀ` in the matmul dtype (f32 when quantized), contiguous.
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dequantized;
        let weight = match &self.weight {
            Weight::Dense(w) => w,
            Weight::Quantized(QMatMul::QTensor(q)) if x.dim(0)? > QUANTIZED_MAX_ROWS => {
                dequantized = q.dequantize(&q.device())?;
                &dequantized
            }
            Weight::Packed(p) if x.dim(0)? > QUANTIZED_MAX_ROWS => {
                dequantized = super::quant_matmul::dequantize(p)?;
                &dequantized
            }
            Weight::Packed(p) => return super::quant_matmul::forward(p, x),
            Weight::Quantized(q) => return q.forward(&x.to_dtype(DType::F32)?.contiguous()?),
        };
        let x = x.to_dtype(weight.dtype())?;
        let rows = x.dim(0)?;
        let cpu = weight.device().is_cpu();
        if cpu
            && self.compute == DType::F32
            && x.rank() == 2
            && (rows <= KERNEL_MAX_ROWS || Isa::detect() != Isa::Portable)
        {
            return x.contiguous()?.apply_op2_no_bwd(weight, &ProjectionOp);
        }
        if cpu && rows > 1 && rows <= SMALL_BATCH_ROWS {
            // The CPU gemm packs the transposed weight when the left side has a few rows, which
            // made batched decode steps 2-3x slower than one row; `(W xᵀ)ᵀ` streams W as it is.
            weight.matmul(&x.t()?)?.t()?.contiguous()
        } else {
            x.matmul(&weight.t()?)
        }
    }
}

/// Projections of one input, told apart by their output rows (q, k and v of an attention
/// block; gate and up of an MLP): one matmul over their stacked weights when they are dense and
/// stacking is asked for (`--stack-projections`), else one matmul each. Stacked, each output is
/// a column range of the one product (a view; its rows are contiguous, the product's width
/// apart).
#[derive(Debug, Clone)]
pub enum Projections {
    /// One matmul; the widths of the parts, in order.
    Stacked {
        /// The stacked weight `[Σ out, in]`.
        linear: Linear,
        /// Each part's output width.
        widths: Vec<usize>,
    },
    /// One matmul per part.
    Each(Vec<Linear>),
}

impl Projections {
    /// `parts` stacked into one weight when `stack` is set and every part is dense (and of one
    /// dtype), else kept apart.
    pub fn new(parts: Vec<Linear>, stack: bool) -> candle_core::Result<Self> {
        let dense: Option<Vec<&Tensor>> = parts.iter().map(Linear::weight).collect();
        let compute = parts.first().map(|p| p.compute);
        match dense {
            Some(weights)
                if stack
                    && weights.len() > 1
                    && parts.iter().all(|p| Some(p.compute) == compute) =>
            {
                let widths = weights.iter().map(|w| w.dim(0)).collect::<Result<_, _>>()?;
                let stacked = Tensor::cat(&weights, 0)?;
                Ok(Self::Stacked {
                    linear: Linear {
                        weight: Weight::Dense(stacked.contiguous()?),
                        compute: parts[0].compute,
                    },
                    widths,
                })
            }
            _ => Ok(Self::Each(parts)),
        }
    }

    /// `x: [rows, in]` → each of the `N` parts' `[rows, out]` in the compute dtype, the LoRA
    /// deltas of `modules` (the parts' modules, in order) added: one call for all of them when
    /// stacked ([`LoraDelta::apply_stacked`]). An error when there are not `N` parts.
    pub fn forward_lora<const N: usize>(
        &self,
        x: &Tensor,
        layer: usize,
        modules: [TargetModule; N],
        lora: &dyn LoraDelta,
        rows: &RowSlots,
    ) -> candle_core::Result<[Tensor; N]> {
        let built = match self {
            Self::Each(parts) => parts.len(),
            Self::Stacked { widths, .. } => widths.len(),
        };
        if built != N {
            candle_core::bail!("{N} projections asked of {built}");
        }
        let parts: Vec<Tensor> = match self {
            Self::Each(parts) => parts
                .iter()
                .zip(modules)
                .map(|(p, m)| lora.apply(layer, m, x, p.forward(x)?, rows))
                .collect::<Result<_, _>>()?,
            Self::Stacked { linear, widths } => {
                lora.apply_stacked(layer, &modules, x, linear.forward(x)?, widths, rows)?
            }
        };
        let n = parts.len();
        parts
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("{n} outputs of {N} projections")))
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Each(parts) => parts.iter().map(Linear::weight_bytes).sum(),
            Self::Stacked { linear, .. } => linear.weight_bytes(),
        }
    }
}

/// The values of a contiguous f32 CPU storage (the custom ops here and in
/// `crate::adapters::delta` read their operands in place through it).
pub(crate) fn cpu_f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => v
            .get(a..b)
            .ok_or_else(|| candle_core::Error::Msg("tensor view out of range".into())),
        _ => candle_core::bail!("expected a contiguous f32 tensor"),
    }
}

/// The mutable slice of a contiguous f32 CPU storage (for in-place ops).
pub(crate) fn cpu_f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => v
            .get_mut(a..b)
            .ok_or_else(|| candle_core::Error::Msg("tensor view out of range".into())),
        _ => candle_core::bail!("expected a contiguous f32 tensor"),
    }
}

/// `x Wᵀ` by `medley_kernels::matmul` over the CPU storages of `x: [rows, in]` (first operand)
/// and `W: [out, in]`, both contiguous f32.
struct ProjectionOp;

impl CustomOp2 for ProjectionOp {
    fn name(&self) -> &'static str {
        "medley-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_features) = xl.shape().dims2()?;
        let (out_features, w_in) = wl.shape().dims2()?;
        if w_in != in_features {
            candle_core::bail!("linear: x has {in_features} features, the weight {w_in}");
        }
        let mut y = vec![0f32; rows * out_features];
        let shape = KernelShape {
            rows,
            in_features,
            out_features,
        };
        matmul_nt(
            shape,
            cpu_f32_slice(xs, xl)?,
            cpu_f32_slice(ws, wl)?,
            &mut y,
        )
        .map_err(|e| candle_core::Error::Msg(format!("linear kernel: {e}")))?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out_features))))
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

    /// Normalises `x: [rows, hidden]`: in f32 in one op; in half precision widened, normalised,
    /// narrowed and scaled like transformers (one fused kernel on a GPU).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.ones.is_none() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps);
        }
        #[cfg(feature = "cuda")]
        if super::fused_cuda::serves(x) {
            return super::fused_cuda::rms_norm(x, &self.weight, self.eps);
        }
        self.forward_unfused(x)
    }

    /// The residual sum `x + a` (in `x`'s dtype, as transformers adds) and its normalisation:
    /// `(sum, normed)`. One fused kernel for half precision on a GPU; an add and
    /// [`RmsNorm::forward`] elsewhere.
    pub fn add_forward(&self, x: &Tensor, a: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if self.ones.is_some() && super::fused_cuda::serves(x) {
            return super::fused_cuda::add_rms_norm(x, a, &self.weight, self.eps);
        }
        // Without the fused kernel, `forward` is `forward_unfused`.
        self.add_forward_unfused(x, a)
    }

    /// [`RmsNorm::add_forward`] through candle ops only (the reference of the fused kernel).
    pub(crate) fn add_forward_unfused(
        &self,
        x: &Tensor,
        a: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let sum = (x + a)?;
        let normed = self.forward_unfused(&sum)?;
        Ok((sum, normed))
    }

    /// [`RmsNorm::forward`] through candle ops only (the reference of the fused kernel).
    pub(crate) fn forward_unfused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.ones {
            None => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
            Some(ones) => {
                let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, ones, self.eps)?;
                normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
            }
        }
    }
}

/// `silu(gate) * up` (the MLP's activation): one fused kernel for half precision on a GPU and
/// for f32 on the CPU, [`silu`] and a product elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused_cuda::serves(gate) {
        return super::fused_cuda::silu_mul(gate, up);
    }
    if super::fused_cpu::serves(gate, up) {
        return super::fused_cpu::silu_mul(gate, up);
    }
    silu(gate)? * up
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

    /// Every row count on both sides of `KERNEL_MAX_ROWS` and of the kernel's packed-gemm
    /// threshold `Isa::packed_min_rows` (and a non-contiguous input) against an
    /// f64 evaluation: f32 sums of K = 37 products differ from the exact sum by at most
    /// `K · eps · Σ|products|` (the standard bound for recursive summation, any order).
    #[test]
    fn cpu_projection_matches_f64_for_all_row_counts() {
        let dev = Device::Cpu;
        let (inf, outf) = (37usize, 19usize);
        let val = |i: usize, seed: usize| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0;
        let wv: Vec<f32> = (0..outf * inf).map(|i| val(i, 1)).collect();
        let lin = Linear::new(
            Tensor::from_vec(wv.clone(), (outf, inf), &dev).unwrap(),
            DType::F32,
        )
        .unwrap();
        let packed = Isa::detect().packed_min_rows().min(1 << 10);
        for rows in [
            1,
            3,
            17,
            KERNEL_MAX_ROWS,
            KERNEL_MAX_ROWS + 1,
            packed,
            packed + 5,
        ] {
            let xv: Vec<f32> = (0..rows * inf).map(|i| val(i, 2)).collect();
            // A transposed copy viewed back: same values, non-contiguous layout.
            let xt = Tensor::from_vec(xv.clone(), (rows, inf), &dev)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap();
            for x in [
                Tensor::from_vec(xv.clone(), (rows, inf), &dev).unwrap(),
                xt.t().unwrap(),
            ] {
                let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for r in 0..rows {
                    for o in 0..outf {
                        let terms =
                            (0..inf).map(|i| xv[r * inf + i] as f64 * wv[o * inf + i] as f64);
                        let want: f64 = terms.clone().sum();
                        let abs: f64 = terms.map(f64::abs).sum();
                        let bound = inf as f64 * f32::EPSILON as f64 * abs;
                        assert!(
                            (y[r][o] as f64 - want).abs() <= bound,
                            "{rows} rows, ({r}, {o})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_linear_on_cpu_runs_in_f32() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (3, 2), &dev).unwrap();
        let lin = Linear::new(w.to_dtype(DType::BF16).unwrap(), DType::BF16).unwrap();
        assert_eq!(lin.weight().unwrap().dtype(), DType::F32);
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
