//! `kernels/cuda/sampling.cu` on the CPU emulator: the greedy kernel's argmax and log-probability
//! per logits row against the host sampler's reading (NaN never chosen, +inf as the largest
//! finite score, ties to the lowest index, a row of -inf gives id 0 and a NaN log-probability),
//! with the GPU launcher's shape. The vocabulary (1000) is not a multiple of the block.

use medley_kernels::launch::{GREEDY_KERNEL, greedy_launch};
use medley_kernels::testing::values;
use medley_kernels_emu::{launch, param};

const VOCAB: usize = 1000;

/// The host sampler's greedy choice of `row`: (id, log-probability) as it computes them,
/// `m - (m + ln z)` in f32 (so a score of f32::MAX absorbs `ln z`), the sum in f64.
fn reference(row: &[f32]) -> (u32, f32) {
    let scores: Vec<f32> = row
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f32::NEG_INFINITY
            } else {
                x.min(f32::MAX)
            }
        })
        .collect();
    let mut id = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[id] {
            id = i;
        }
    }
    let m = scores[id];
    if m == f32::NEG_INFINITY {
        return (0, f32::NAN);
    }
    let z: f64 = scores.iter().map(|&s| ((s - m) as f64).exp()).sum();
    let log_z = m + z.ln() as f32;
    (id as u32, m - log_z)
}

fn rows() -> Vec<Vec<f32>> {
    let random = |seed| {
        values(VOCAB, seed)
            .into_iter()
            .map(|v| 8.0 * v)
            .collect::<Vec<_>>()
    };
    let mut tied = random(2);
    for i in [17, 400, 999] {
        tied[i] = 20.0; // the largest, three times: the lowest index wins
    }
    let mut odd = random(3);
    odd[5] = f32::NAN;
    odd[600] = f32::INFINITY;
    odd[601] = f32::INFINITY; // +inf read as f32::MAX: a tie, 600 wins
    let mut last = random(4);
    last[VOCAB - 1] = 50.0; // in the last, partial sweep of the block
    vec![
        random(1),
        tied,
        odd,
        last,
        vec![f32::NEG_INFINITY; VOCAB],
        vec![f32::NAN; VOCAB],
        vec![-1e30; VOCAB],
    ]
}

#[test]
fn greedy_matches_the_host_sampler() {
    let rows = rows();
    let n = rows.len();
    let logits: Vec<f32> = rows.concat();
    // Garbage the kernel must overwrite: every word of the output.
    let mut out = vec![0xdead_beef_u32; 2 * n];
    let (mut lp, mut op) = (logits.as_ptr(), out.as_mut_ptr());
    let (mut r, mut v) = (n as u32, VOCAB as u32);
    let mut params = [param(&mut lp), param(&mut op), param(&mut r), param(&mut v)];
    let (grid, block) = greedy_launch(n as u32);
    // SAFETY: the parameters are the kernel's; logits hold rows × vocab values, out 2 × rows.
    unsafe { launch(GREEDY_KERNEL, (grid, block, 0), &mut params) }.expect("launch");
    for (i, row) in rows.iter().enumerate() {
        let (id, logprob) = reference(row);
        let got = f32::from_bits(out[n + i]);
        assert_eq!(out[i], id, "row {i}: id");
        if logprob.is_nan() {
            assert!(got.is_nan(), "row {i}: logprob {got}, want NaN");
        } else {
            assert!(
                (got - logprob).abs() <= 1e-5 * logprob.abs().max(1.0),
                "row {i}: logprob {got}, want {logprob}"
            );
        }
    }
    // The three tied maxima and the equal rows: ties go to the lowest index.
    assert_eq!((out[1], out[2], out[6]), (17, 600, 0));
}
