//! Fused elementwise ops of the CPU forward pass (f32): one pass over the operands instead of
//! candle's op-by-op evaluation, each op a fresh buffer and a scalar `expf` per value.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernel_math::{Fused, MulAdd, Unfused, exp_approx};
use super::layers::cpu_f32_slice;

/// Values per parallel chunk (64 KiB of each operand).
const CHUNK: usize = 16 << 10;

/// Whether [`silu_mul`] takes both operands: f32 CPU tensors of one shape.
pub(crate) fn serves(gate: &Tensor, up: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    f32_cpu(gate) && f32_cpu(up) && gate.shape() == up.shape()
}

/// `silu(gate) * up` = `gate / (1 + e^-gate) * up` in one pass (the exponential within ~2 ulp
/// of `expf`, `kernel_math::exp_approx`; the division and the product rounded as candle's
/// `silu` then `mul` round them). Callers check [`serves`]. Views (a stacked gate/up
/// product's column ranges) are copied to contiguous operands first.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMulOp)
}

struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "medley-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("silu_mul: gate {:?}, up {:?}", gl.shape(), ul.shape());
        }
        let (g, u) = (cpu_f32_slice(gs, gl)?, cpu_f32_slice(us, ul)?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| silu_mul_into(o, g, u));
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// One chunk, compiled for the widest vectors the CPU has (the loop vectorises).
fn silu_mul_into(o: &mut [f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the one feature the function is compiled for.
        return unsafe { silu_mul_avx512(o, g, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: as above, both features.
        return unsafe { silu_mul_avx2(o, g, u) };
    }
    silu_mul_body::<Unfused>(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_mul_avx512(o: &mut [f32], g: &[f32], u: &[f32]) {
    silu_mul_body::<Fused>(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    silu_mul_body::<Fused>(o, g, u)
}

#[inline(always)]
fn silu_mul_body<M: MulAdd>(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp_approx::<M>(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Against candle's `silu` then `mul` (scalar `expf`): a few ulp apart, over values from
    /// -90 to 90 (both ends of the exponential's clamp) and a length that is not a whole number
    /// of chunks.
    #[test]
    fn matches_candle_silu_then_mul() {
        let n = CHUNK * 2 + 6;
        let g: Vec<f32> = (0..n)
            .map(|i| -90.0 + 180.0 * i as f32 / n as f32)
            .collect();
        let u: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin() * 3.0).collect();
        let dev = Device::Cpu;
        let (gt, ut) = (
            Tensor::from_vec(g, (n / 7, 7), &dev).unwrap(),
            Tensor::from_vec(u, (n / 7, 7), &dev).unwrap(),
        );
        assert!(serves(&gt, &ut));
        let got: Vec<f32> = silu_mul(&gt, &ut)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (gt.silu().unwrap() * &ut)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Below -88 candle's `expf` overflows and its silu is 0, where the clamped exponential
            // gives about g·e^-88 (~1e-37): both round the true value (g·e^g) to nothing.
            let tol = 4.0 * f32::EPSILON * b.abs() + 1e-35;
            assert!((a - b).abs() <= tol, "{i}: {a} vs {b}");
        }
        assert!(!serves(&gt, &ut.t().unwrap()));
        // Column ranges of one wider tensor (a stacked gate/up product) give the same values.
        let stacked = Tensor::cat(&[&gt, &ut], 1).unwrap();
        let (gv, uv) = (
            stacked.narrow(1, 0, 7).unwrap(),
            stacked.narrow(1, 7, 7).unwrap(),
        );
        assert!(serves(&gv, &uv));
        let from_views: Vec<f32> = silu_mul(&gv, &uv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(from_views, got);
    }
}
