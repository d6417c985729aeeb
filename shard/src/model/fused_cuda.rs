//! One-launch RMSNorm, residual add + RMSNorm and SiLU·mul for half-precision activations on a
//! GPU (`kernels/cuda/fused.cu`), rounding where transformers rounds: they replace the chains of
//! candle ops of [`super::layers::RmsNorm`] (widen, normalise, narrow, scale; with the residual
//! add before it, the add too) and of the MLP's `silu(gate) * up` (widen, SiLU, narrow,
//! multiply). `MEDLEY_CUDA_FUSED=off` keeps the chains (for comparisons).

use super::cuda_launch::{kernel, launch_config};
use super::row_span::RowSpan;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use medley_kernels::cuda::{FUSED_PTX, elementwise_launch, fused_kernel_names, rms_norm_launch};

/// The name the PTX module is cached under in candle's device.
const MODULE: &str = "medley_fused";

/// Whether `MEDLEY_CUDA_FUSED=off` turned the fused kernels off (these, and the rotary
/// embedding with the KV write of [`super::rope_cuda`]).
pub(crate) fn turned_off() -> bool {
    super::cuda_launch::env_is!("MEDLEY_CUDA_FUSED", "off")
}

/// Whether the fused kernels serve activations `x` (bf16 or f16 on a GPU, not turned off).
pub(crate) fn serves(x: &Tensor) -> bool {
    !turned_off() && x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// RMSNorm of `x: [rows, hidden]` with weight `w: [hidden]` (both of `x`'s dtype).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Fused::RmsNorm { eps })
}

/// The residual sum `x + a` and its RMSNorm with weight `w`, in one launch: `(sum, normed)`,
/// both `[rows, hidden]` (two halves of one allocation).
pub(crate) fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &a.contiguous()?,
        &w.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `silu(gate) * up` for two `[rows, width]` tensors: contiguous, or column ranges of wider
/// ones (a stacked gate/up product) read at their row stride; others are copied first.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let rows = |t: &Tensor| match RowSpan::of(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
    };
    rows(gate)?.apply_op2_no_bwd(&rows(up)?, &Fused::SiluMul)
}

enum Fused {
    RmsNorm { eps: f32 },
    SiluMul,
}

fn range(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("fused kernels: an operand is not contiguous"),
    }
}

/// Where `l`'s rows lie (each contiguous, at any stride).
fn span(l: &Layout) -> candle_core::Result<RowSpan> {
    match RowSpan::of(l) {
        Some(s) => Ok(s),
        None => candle_core::bail!("fused kernels: an operand is not rows of contiguous columns"),
    }
}

impl Fused {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let shape = l1.shape().clone();
        let n = shape.elem_count();
        // The operands' elements: contiguous for the norm; for SiLU·mul from the first row to
        // the end of the last, with the rows' width and strides.
        let (r1, r2, strided) = match self {
            Self::RmsNorm { .. } => (range(l1)?, range(l2)?, None),
            Self::SiluMul => {
                let (g, u) = (span(l1)?, span(l2)?);
                (
                    g.start..g.end,
                    u.start..u.end,
                    Some((g.width, g.stride, u.stride)),
                )
            }
        };
        let a = s1.as_cuda_slice::<T>()?.slice(r1);
        let b = s2.as_cuda_slice::<T>()?.slice(r2);
        let names = fused_kernel_names(suffix);
        // SAFETY: every launch below writes all n elements (none when n is 0).
        let mut out = unsafe { dev.alloc::<T>(n) }?;
        if n == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
        }
        match self {
            Self::RmsNorm { eps } => {
                let (rows, hidden) = shape.dims2()?;
                if l2.shape().dims1()? != hidden {
                    candle_core::bail!("rms_norm: x {shape:?}, weight {:?}", l2.shape());
                }
                let func = kernel(&dev, MODULE, FUSED_PTX, names[0])?;
                let stream = dev.cuda_stream();
                let mut launch = stream.launch_builder(&func);
                let hidden = hidden as u32;
                launch.arg(&a).arg(&b).arg(&mut out).arg(&hidden).arg(eps);
                // SAFETY: matches medley_rms_norm_* in kernels/cuda/fused.cu; x and out have
                // rows × hidden elements, w hidden.
                unsafe { launch.launch(launch_config(rms_norm_launch(rows as u32))) }.w()?;
            }
            Self::SiluMul => {
                let Some((width, g_stride, u_stride)) = strided else {
                    candle_core::bail!("silu_mul: operands are not rows of contiguous columns");
                };
                if l2.shape() != &shape || u32::try_from(n).is_err() {
                    candle_core::bail!("silu_mul: gate {shape:?}, up {:?}", l2.shape());
                }
                let func = kernel(&dev, MODULE, FUSED_PTX, names[1])?;
                let stream = dev.cuda_stream();
                let mut launch = stream.launch_builder(&func);
                let [n32, width, g_stride, u_stride] =
                    [n, width, g_stride, u_stride].map(|v| v as u32);
                launch.arg(&a).arg(&b).arg(&mut out).arg(&n32);
                launch.arg(&width).arg(&g_stride).arg(&u_stride);
                // SAFETY: matches medley_silu_mul_* in kernels/cuda/fused.cu; out has n elements,
                // gate and up rows × width at their row strides, inside their slices (`span`).
                unsafe { launch.launch(launch_config(elementwise_launch(n32))) }.w()?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        match self {
            Self::RmsNorm { .. } => "medley-rms-norm",
            Self::SiluMul => "medley-silu-mul",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA tensors only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            candle_core::bail!("{}: operands of two dtypes", self.name());
        }
        match s1.dtype() {
            DType::BF16 => self.run::<half::bf16>(s1, l1, s2, l2, "bf16"),
            DType::F16 => self.run::<half::f16>(s1, l1, s2, l2, "f16"),
            other => candle_core::bail!("{}: no kernel for {other:?}", self.name()),
        }
    }
}

/// The residual add + RMSNorm: `[2, rows, hidden]` holding the sum, then the normalised rows.
struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        (sx, lx): (&CudaStorage, &Layout),
        (sa, la): (&CudaStorage, &Layout),
        (sw, lw): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = sx.device.clone();
        let (rows, hidden) = lx.shape().dims2()?;
        if la.shape() != lx.shape() || lw.shape().dims1()? != hidden {
            candle_core::bail!(
                "add_rms_norm: x {:?}, a {:?}, weight {:?}",
                lx.shape(),
                la.shape(),
                lw.shape()
            );
        }
        let n = rows * hidden;
        let shape = Shape::from((2, rows, hidden));
        // SAFETY: the launch writes all 2n elements (none when n is 0).
        let mut both = unsafe { dev.alloc::<T>(2 * n) }?;
        if n == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(both, dev), shape));
        }
        let x = sx.as_cuda_slice::<T>()?.slice(range(lx)?);
        let a = sa.as_cuda_slice::<T>()?.slice(range(la)?);
        let w = sw.as_cuda_slice::<T>()?.slice(range(lw)?);
        let (mut sum, mut out) = both.split_at_mut(n);
        let name = fused_kernel_names(suffix)[2];
        let func = kernel(&dev, MODULE, FUSED_PTX, name)?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let hidden = hidden as u32;
        launch.arg(&x).arg(&a).arg(&w).arg(&mut sum).arg(&mut out);
        launch.arg(&hidden).arg(&self.eps);
        let cfg = launch_config(rms_norm_launch(rows as u32));
        // SAFETY: matches medley_add_rms_norm_* in kernels/cuda/fused.cu; x, a, sum and out
        // have rows × hidden elements, w hidden.
        unsafe { launch.launch(cfg) }.w()?;
        drop(launch);
        Ok((CudaStorage::wrap_cuda_slice(both, dev), shape))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "medley-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA tensors only", self.name())
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sa: &CudaStorage,
        la: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if sx.dtype() != sa.dtype() || sx.dtype() != sw.dtype() {
            candle_core::bail!("{}: operands of several dtypes", self.name());
        }
        let ops = ((sx, lx), (sa, la), (sw, lw));
        match sx.dtype() {
            DType::BF16 => self.run::<half::bf16>(ops.0, ops.1, ops.2, "bf16"),
            DType::F16 => self.run::<half::f16>(ops.0, ops.1, ops.2, "f16"),
            other => candle_core::bail!("{}: no kernel for {other:?}", self.name()),
        }
    }
}
