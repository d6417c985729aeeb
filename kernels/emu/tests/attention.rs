//! `kernels/cuda/attention.cu` on the CPU emulator: the KV write and the paged attention of a
//! mixed step (a prefill chunk, decode rows with one and with three blocks of context), with and
//! without a sliding window, f32/bf16/f16, against an f64 softmax over the same pool, with the
//! GPU launcher's shapes. The head dimension (40) is not a multiple of the warp, and block
//! tables are out of order.

use medley_kernels::launch::{attention_launch, kv_write_launch};
use medley_kernels::testing::values;
use medley_kernels_emu::{Act, launch, param};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 40;
const BLOCK: usize = 16;
const BLOCKS: usize = 6;

/// The step: per sequence its block table and the positions of its rows in this step.
struct Step {
    tables: Vec<Vec<u32>>,
    /// (sequence, position) per row.
    rows: Vec<(usize, usize)>,
}

fn step() -> Step {
    let mut rows: Vec<(usize, usize)> = (0..6).map(|p| (1, p)).collect(); // prefill of 6
    rows.push((0, 21)); // decode, 22 tokens of context over two blocks
    rows.push((2, 40)); // decode, 41 tokens over three blocks
    Step {
        tables: vec![vec![3, 0], vec![5], vec![1, 4, 2]],
        rows,
    }
}

impl Step {
    fn stride(&self) -> usize {
        self.tables.iter().map(Vec::len).max().unwrap_or(1)
    }

    fn slot(&self, seq: usize, pos: usize) -> usize {
        self.tables[seq][pos / BLOCK] as usize * BLOCK + pos % BLOCK
    }

    /// The index words the shard uploads: slots, chunks, positions, then the block tables.
    fn index(&self) -> Vec<u32> {
        let mut w: Vec<u32> = self
            .rows
            .iter()
            .map(|&(s, p)| self.slot(s, p) as u32)
            .collect();
        w.extend(self.rows.iter().map(|&(s, _)| s as u32));
        w.extend(self.rows.iter().map(|&(_, p)| p as u32));
        for t in &self.tables {
            w.extend(t.iter().copied());
            w.extend(std::iter::repeat_n(0, self.stride() - t.len()));
        }
        w
    }
}

/// Worst |got − want| over the largest |want|; an output left unwritten (NaN) counts as an
/// infinite error.
fn compare(got: &[f32], want: &[f64]) -> f64 {
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(
            0.0,
            |a: f64, e| if e.is_nan() { f64::INFINITY } else { a.max(e) },
        );
    err / want.iter().map(|w| w.abs()).fold(0.0, f64::max)
}

fn run<T: Act>(window: usize) -> f64 {
    let step = step();
    let rows = step.rows.len();
    let width = KV_HEADS * D;
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    // The pool holds earlier steps' keys and values; this step's are written by kv_write.
    let mut kc: Vec<T> = round(values(BLOCKS * BLOCK * width, 1));
    let mut vc: Vec<T> = round(values(BLOCKS * BLOCK * width, 2));
    let k_new: Vec<T> = round(values(rows * width, 3));
    let v_new: Vec<T> = round(values(rows * width, 4));
    let q: Vec<T> = round(
        values(rows * HEADS * D, 5)
            .into_iter()
            .map(|v| 2.0 * v)
            .collect(),
    );
    let mut index = step.index();

    let mut ip = index.as_mut_ptr();
    let mut w = width as u32;
    for (src, pool) in [(&k_new, &mut kc), (&v_new, &mut vc)] {
        let (mut sp, mut pp) = (src.as_ptr(), pool.as_mut_ptr());
        let mut params = [
            param(&mut sp),
            param(&mut pp),
            param(&mut ip),
            param(&mut w),
        ];
        let (grid, block) = kv_write_launch(rows as u32);
        let name = format!("medley_kv_write_{}", T::SUFFIX);
        // SAFETY: the parameters are the kernel's; src holds rows × width values, the pool
        // BLOCKS × BLOCK × width, and every slot of the index is inside it.
        unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("kv_write");
    }
    for (r, &(s, p)) in step.rows.iter().enumerate() {
        let slot = step.slot(s, p);
        for e in 0..width {
            assert_eq!(
                kc[slot * width + e].to_f32().to_bits(),
                k_new[r * width + e].to_f32().to_bits()
            );
            assert_eq!(
                vc[slot * width + e].to_f32().to_bits(),
                v_new[r * width + e].to_f32().to_bits()
            );
        }
    }

    let scale = 1.0 / (D as f32).sqrt();
    let mut want = vec![0f64; rows * HEADS * D];
    for (r, &(s, p)) in step.rows.iter().enumerate() {
        let lo = if window > 0 && p + 1 > window {
            p + 1 - window
        } else {
            0
        };
        for h in 0..HEADS {
            let kvh = h / (HEADS / KV_HEADS);
            let qr = &q[(r * HEADS + h) * D..][..D];
            let at = |pool: &[T], j: usize, e: usize| {
                pool[(step.slot(s, j) * KV_HEADS + kvh) * D + e].to_f32() as f64
            };
            let scores: Vec<f64> = (lo..=p)
                .map(|j| {
                    let dot: f64 = (0..D).map(|e| qr[e].to_f32() as f64 * at(&kc, j, e)).sum();
                    dot * scale as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ps: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = ps.iter().sum();
            for e in 0..D {
                let v: f64 = (lo..=p).zip(&ps).map(|(j, pj)| pj * at(&vc, j, e)).sum();
                want[(r * HEADS + h) * D + e] = v / total;
            }
        }
    }

    let mut out = vec![T::from_f32(f32::NAN); rows * HEADS * D];
    let (mut qp, mut kp, mut vp, mut op) = (q.as_ptr(), kc.as_ptr(), vc.as_ptr(), out.as_mut_ptr());
    let (mut rows_u, mut heads, mut kv_heads, mut d) =
        (rows as u32, HEADS as u32, KV_HEADS as u32, D as u32);
    let (mut bt, mut stride, mut win, mut sc) =
        (BLOCK as u32, step.stride() as u32, window as u32, scale);
    let mut params = [
        param(&mut qp),
        param(&mut kp),
        param(&mut vp),
        param(&mut op),
        param(&mut ip),
        param(&mut rows_u),
        param(&mut heads),
        param(&mut kv_heads),
        param(&mut d),
        param(&mut bt),
        param(&mut stride),
        param(&mut win),
        param(&mut sc),
    ];
    let (grid, block) = attention_launch(rows as u32, HEADS as u32);
    let name = format!("medley_paged_attention_{}", T::SUFFIX);
    // SAFETY: the parameters are the kernel's; q and out hold rows × heads × d values, the
    // pools BLOCKS × BLOCK × kv_heads × d, and every table entry is a block of the pool.
    unsafe { launch(&name, (grid, block, 0), &mut params) }.expect("attention");
    let got: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    compare(&got, &want)
}

fn check<T: Act>() {
    for window in [0, 8] {
        let err = run::<T>(window);
        assert!(
            err <= T::TOLERANCE,
            "{} window {window}: relative error {err:.2e} (bound {:.0e})",
            T::SUFFIX,
            T::TOLERANCE
        );
    }
}

#[test]
fn paged_attention_f32_matches_an_f64_softmax() {
    check::<f32>();
}

#[test]
fn paged_attention_bf16_matches_an_f64_softmax() {
    check::<half::bf16>();
}

#[test]
fn paged_attention_f16_matches_an_f64_softmax() {
    check::<half::f16>();
}
