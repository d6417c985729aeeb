//! `kernels/cuda/fused.cu` on the CPU emulator: the half-precision RMSNorm, residual add +
//! RMSNorm and SiLU·mul against their formulas (transformers' rounding points, evaluated in f64
//! for the norm's sum), with the GPU launcher's shapes.

use medley_kernels::launch::{elementwise_launch, rms_norm_launch};
use medley_kernels::testing::values;
use medley_kernels_emu::{Act, launch, param};

/// Worst |got − want| over the largest |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|w| (*w as f64).abs()).fold(0.0, f64::max);
    err / scale.max(f64::MIN_POSITIVE)
}

/// `T(w * T(x * rsqrt(mean(x²) + eps)))` per row of `x` (values of `T`, widened), the sum of
/// squares in f64.
fn norm_rows<T: Act>(x: &[f32], w: &[T], hidden: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let ss: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum();
        let inv = (1.0 / (ss / hidden as f64 + eps as f64).sqrt()) as f32;
        for (v, w) in row.iter().zip(w) {
            let n = T::from_f32(v * inv).to_f32();
            out.push(T::from_f32(w.to_f32() * n).to_f32());
        }
    }
    out
}

fn rms_norm<T: Act>(rows: usize, hidden: usize) -> f64 {
    let x: Vec<T> = values(rows * hidden, 1)
        .into_iter()
        .map(|v| T::from_f32(3.0 * v))
        .collect();
    let w: Vec<T> = values(hidden, 2)
        .into_iter()
        .map(|v| T::from_f32(1.0 + v / 2.0))
        .collect();
    let eps = 1e-5f32;
    let widened: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = norm_rows::<T>(&widened, &w, hidden, eps);
    let mut out = vec![T::from_f32(f32::NAN); rows * hidden];
    let (mut xp, mut wp, mut op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let (mut h, mut e) = (hidden as u32, eps);
    let mut params = [
        param(&mut xp),
        param(&mut wp),
        param(&mut op),
        param(&mut h),
        param(&mut e),
    ];
    let (grid, block) = rms_norm_launch(rows as u32);
    let name = format!("medley_rms_norm_{}", T::SUFFIX);
    // SAFETY: the parameters are the kernel's; x and out hold rows × hidden values, w hidden.
    unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("launch");
    let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    rel_err(&got, &want)
}

/// The residual add and RMSNorm in one launch: the sum (torch's half-precision add) must be
/// exact, the normalised row as [`rms_norm`]'s.
fn add_rms_norm<T: Act>(rows: usize, hidden: usize) -> (f64, f64) {
    let n = rows * hidden;
    let x: Vec<T> = values(n, 5)
        .into_iter()
        .map(|v| T::from_f32(3.0 * v))
        .collect();
    let a: Vec<T> = values(n, 6).into_iter().map(T::from_f32).collect();
    let w: Vec<T> = values(hidden, 7)
        .into_iter()
        .map(|v| T::from_f32(1.0 + v / 2.0))
        .collect();
    let eps = 1e-5f32;
    let want_sum: Vec<f32> = x
        .iter()
        .zip(&a)
        .map(|(x, a)| T::from_f32(x.to_f32() + a.to_f32()).to_f32())
        .collect();
    let want = norm_rows::<T>(&want_sum, &w, hidden, eps);
    let mut sum = vec![T::from_f32(f32::NAN); n];
    let mut out = vec![T::from_f32(f32::NAN); n];
    let (mut xp, mut ap, mut wp) = (x.as_ptr(), a.as_ptr(), w.as_ptr());
    let (mut sp, mut op) = (sum.as_mut_ptr(), out.as_mut_ptr());
    let (mut h, mut e) = (hidden as u32, eps);
    let mut params = [
        param(&mut xp),
        param(&mut ap),
        param(&mut wp),
        param(&mut sp),
        param(&mut op),
        param(&mut h),
        param(&mut e),
    ];
    let (grid, block) = rms_norm_launch(rows as u32);
    let name = format!("medley_add_rms_norm_{}", T::SUFFIX);
    // SAFETY: the parameters are the kernel's; x, a, sum and out hold rows × hidden values, w
    // hidden.
    unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("launch");
    let got_sum: Vec<f32> = sum.iter().map(|v| v.to_f32()).collect();
    let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    (rel_err(&got_sum, &want_sum), rel_err(&got, &want))
}

/// `silu_mul` over `rows` × `width` values, gate and up read from rows `gate_stride` and
/// `up_stride` apart in their buffers (column ranges of a stacked product when above `width`).
fn silu_mul<T: Act>(rows: usize, width: usize, gate_stride: usize, up_stride: usize) -> f64 {
    let buffer = |stride: usize, seed: u64, scale: f32| -> Vec<T> {
        values(rows * stride, seed)
            .into_iter()
            .map(|v| T::from_f32(scale * v))
            .collect()
    };
    let (gate, up) = (buffer(gate_stride, 3, 8.0), buffer(up_stride, 4, 1.0));
    // out = T(T(silu(f32(gate))) * up), over each row's first `width` values.
    let want: Vec<f32> = (0..rows * width)
        .map(|i| {
            let (r, c) = (i / width, i % width);
            let g = gate[r * gate_stride + c].to_f32();
            let s = T::from_f32(g / (1.0 + (-g).exp())).to_f32();
            T::from_f32(s * up[r * up_stride + c].to_f32()).to_f32()
        })
        .collect();
    let n = rows * width;
    let mut out = vec![T::from_f32(f32::NAN); n];
    let (mut gp, mut upp, mut op) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let (mut len, mut w) = (n as u32, width as u32);
    let (mut gs, mut us) = (gate_stride as u32, up_stride as u32);
    let mut params = [
        param(&mut gp),
        param(&mut upp),
        param(&mut op),
        param(&mut len),
        param(&mut w),
        param(&mut gs),
        param(&mut us),
    ];
    let (grid, block) = elementwise_launch(n as u32);
    let name = format!("medley_silu_mul_{}", T::SUFFIX);
    // SAFETY: the parameters are the kernel's; gate and up hold rows rows of their strides, out
    // n values.
    unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("launch");
    let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    rel_err(&got, &want)
}

/// Shapes with a partial last pass of the block over the row (4099 = 16 × 256 + 3) and a
/// partial last block of the elementwise grid.
fn check<T: Act>() {
    for (rows, hidden) in [(7, 2048), (3, 4099), (1, 64)] {
        let err = rms_norm::<T>(rows, hidden);
        assert!(
            err <= T::TOLERANCE,
            "rms_norm {} {rows}×{hidden}: {err:.2e}",
            T::SUFFIX
        );
    }
    for (rows, hidden) in [(7, 2048), (3, 4099)] {
        let (sum_err, err) = add_rms_norm::<T>(rows, hidden);
        assert!(
            sum_err == 0.0,
            "add_rms_norm {} sum: {sum_err:.2e}",
            T::SUFFIX
        );
        assert!(
            err <= T::TOLERANCE,
            "add_rms_norm {} {rows}×{hidden}: {err:.2e}",
            T::SUFFIX
        );
    }
    // Contiguous operands, then column ranges of a stacked gate/up product (rows twice as
    // wide) and of two different widths.
    for (rows, width, gs, us) in [
        (7, 5632, 5632, 5632),
        (1, 1, 1, 1),
        (1, 257, 257, 257),
        (7, 5632, 2 * 5632, 2 * 5632),
        (3, 257, 260, 514),
    ] {
        let err = silu_mul::<T>(rows, width, gs, us);
        assert!(
            err <= T::TOLERANCE,
            "silu_mul {} {rows}×{width} (rows {gs} and {us} apart): {err:.2e}",
            T::SUFFIX
        );
    }
}

#[test]
fn fused_bf16_kernels_match_their_formulas() {
    check::<half::bf16>();
}

#[test]
fn fused_f16_kernels_match_their_formulas() {
    check::<half::f16>();
}
