//! `medley_rope_kv_write_*` (`kernels/cuda/attention.cu`) on the CPU emulator: the rotary
//! embedding of a step's queries and keys and the KV write in one launch, against
//! transformers' `x * cos + rotate_half(x) * sin` with each product and the sum rounded to the
//! activation type, bit for bit, f32/bf16/f16. The queries, keys and values are column ranges of
//! one fused projection (rows `(heads + 2 kv_heads) d` apart); slots out of order; every slot
//! the step does not write must keep its value.

use medley_kernels::launch::kv_write_launch;
use medley_kernels::testing::values;
use medley_kernels_emu::{Act, launch, param};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 40;
const SLOTS: usize = 40;
const ROW_SLOTS: [u32; 5] = [9, 2, 30, 17, 0];

/// transformers' rotation of `x` (one head) by `cos`/`sin` (`D / 2` each), rounded like torch.
fn rotate<T: Act>(x: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
    let half = D / 2;
    let mul = |a: T, b: T| T::from_f32(a.to_f32() * b.to_f32()).to_f32();
    let mut out = vec![T::from_f32(0.0); D];
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        out[i] = T::from_f32(mul(x1, cos[i]) - mul(x2, sin[i]));
        out[i + half] = T::from_f32(mul(x2, cos[i]) + mul(x1, sin[i]));
    }
    out
}

fn check<T: Act>() {
    let rows = ROW_SLOTS.len();
    let (half, kvw) = (D / 2, KV_HEADS * D);
    let stride = (HEADS + 2 * KV_HEADS) * D;
    let round = |v: Vec<f32>, scale: f32| -> Vec<T> {
        v.into_iter().map(|x| T::from_f32(scale * x)).collect()
    };
    let qkv = round(values(rows * stride, 1), 3.0);
    let angles = values(rows * half, 2);
    let cos: Vec<T> = angles
        .iter()
        .map(|a| T::from_f32((7.0 * a).cos()))
        .collect();
    let sin: Vec<T> = angles
        .iter()
        .map(|a| T::from_f32((7.0 * a).sin()))
        .collect();
    let before_k = round(values(SLOTS * kvw, 3), 1.0);
    let before_v = round(values(SLOTS * kvw, 4), 1.0);
    let (mut kpool, mut vpool) = (before_k.clone(), before_v.clone());
    let mut q_out = vec![T::from_f32(f32::NAN); rows * HEADS * D];
    let mut index = ROW_SLOTS.to_vec();

    let base = qkv.as_ptr();
    // SAFETY: offsets inside qkv (every row holds q, then k, then v).
    let (mut qp, mut kp, mut vp) =
        unsafe { (base, base.add(HEADS * D), base.add((HEADS + KV_HEADS) * D)) };
    let (mut cp, mut sp) = (cos.as_ptr(), sin.as_ptr());
    let (mut op, mut kpp, mut vpp, mut ip) = (
        q_out.as_mut_ptr(),
        kpool.as_mut_ptr(),
        vpool.as_mut_ptr(),
        index.as_mut_ptr(),
    );
    let (mut qs, mut ks, mut vs) = (stride as u32, stride as u32, stride as u32);
    let (mut h, mut g, mut d) = (HEADS as u32, KV_HEADS as u32, D as u32);
    let mut params = [
        param(&mut qp),
        param(&mut kp),
        param(&mut vp),
        param(&mut cp),
        param(&mut sp),
        param(&mut op),
        param(&mut kpp),
        param(&mut vpp),
        param(&mut ip),
        param(&mut qs),
        param(&mut ks),
        param(&mut vs),
        param(&mut h),
        param(&mut g),
        param(&mut d),
    ];
    let (grid, block) = kv_write_launch(rows as u32);
    let name = format!("medley_rope_kv_write_{}", T::SUFFIX);
    // SAFETY: the parameters are the kernel's; rows of qkv hold q, k and v at the stride, cos and
    // sin rows × d/2 values, q_out rows × heads × d, the pools SLOTS × kv_heads × d, and every
    // slot of the index is inside them.
    unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("rope_kv_write");

    let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    for (r, &slot) in ROW_SLOTS.iter().enumerate() {
        let row = &qkv[r * stride..][..stride];
        let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        for hh in 0..HEADS {
            let want = rotate(&row[hh * D..][..D], c, s);
            let got = &q_out[(r * HEADS + hh) * D..][..D];
            assert_eq!(
                bits(got),
                bits(&want),
                "{} row {r} query head {hh}",
                T::SUFFIX
            );
        }
        let slot = slot as usize;
        for gg in 0..KV_HEADS {
            let want = rotate(&row[(HEADS + gg) * D..][..D], c, s);
            let got = &kpool[(slot * KV_HEADS + gg) * D..][..D];
            assert_eq!(
                bits(got),
                bits(&want),
                "{} row {r} key head {gg}",
                T::SUFFIX
            );
        }
        let v = &row[(HEADS + KV_HEADS) * D..][..kvw];
        assert_eq!(
            bits(&vpool[slot * kvw..][..kvw]),
            bits(v),
            "{} row {r} values",
            T::SUFFIX
        );
    }
    for slot in (0..SLOTS).filter(|s| !ROW_SLOTS.contains(&(*s as u32))) {
        let at = |p: &[T]| bits(&p[slot * kvw..][..kvw]);
        assert_eq!(at(&kpool), at(&before_k), "slot {slot} keys");
        assert_eq!(at(&vpool), at(&before_v), "slot {slot} values");
    }
}

#[test]
fn rope_kv_write_f32_rounds_like_transformers() {
    check::<f32>();
}

#[test]
fn rope_kv_write_bf16_rounds_like_transformers() {
    check::<half::bf16>();
}

#[test]
fn rope_kv_write_f16_rounds_like_transformers() {
    check::<half::f16>();
}
