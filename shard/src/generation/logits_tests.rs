//! Unit tests of the score-level math against hand-computed values and `f32::exp`.

use super::*;

/// Values below are computed by hand from f32 inputs through a handful of f32 operations, so
/// they agree to a few ulps; 1e-6 absolute is far above that and far below any real error.
const TOL: f32 = 1e-6;

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g == w) || (g - w).abs() <= tol;
        assert!(ok, "index {i}: got {g}, want {w} (tol {tol}); {got:?}");
    }
}

fn penalties(rep: f32, freq: f32, pres: f32) -> SamplingParams {
    SamplingParams {
        repetition_penalty: rep,
        frequency_penalty: freq,
        presence_penalty: pres,
        ..SamplingParams::default()
    }
}

#[test]
fn load_scores_sanitises_non_finite_values() {
    let mut s = Vec::new();
    load_scores(&mut s, &[1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    assert_eq!(s, vec![1.0, f32::NEG_INFINITY, f32::MAX, f32::NEG_INFINITY]);
    load_scores(&mut s, &[f32::NEG_INFINITY, f32::NAN]);
    assert_eq!(s, vec![0.0, 0.0]);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut s = vec![2.0, -1.0, 0.5, 3.0];
    let mut counts = vec![0; 4];
    // Token 9 is outside the vocabulary and ignored; repeats are penalised once.
    apply_penalties(
        &mut s,
        &mut counts,
        &[0, 1, 1, 9],
        &penalties(2.0, 0.0, 0.0),
    );
    assert_close(&s, &[1.0, -2.0, 0.5, 3.0], TOL);
    assert!(counts.iter().all(|&c| c == 0), "scratch restored");
}

#[test]
fn frequency_and_presence_penalties_follow_openai() {
    let mut s = vec![2.0, -1.0, 0.5, 3.0];
    let mut counts = vec![0; 4];
    apply_penalties(&mut s, &mut counts, &[0, 1, 1], &penalties(1.0, 0.5, 0.25));
    // id 0: 2 - 0.5*1 - 0.25; id 1: -1 - 0.5*2 - 0.25.
    assert_close(&s, &[1.25, -2.25, 0.5, 3.0], TOL);

    // Negative penalties encourage repetition.
    let mut s = vec![0.0, 0.0];
    apply_penalties(&mut s, &mut counts, &[1, 1, 1], &penalties(1.0, -1.0, -0.5));
    assert_close(&s, &[0.0, 3.5], TOL);
}

#[test]
fn repetition_penalty_comes_before_frequency_and_presence() {
    let mut s = vec![2.0, -1.0, 0.5, 3.0];
    let mut counts = vec![0; 4];
    apply_penalties(&mut s, &mut counts, &[0, 1, 1], &penalties(2.0, 0.5, 0.25));
    // id 0: 2/2 - 0.75 = 0.25; id 1: -1*2 - 1.0 - 0.25 = -3.25.
    assert_close(&s, &[0.25, -3.25, 0.5, 3.0], TOL);
}

#[test]
fn no_penalty_leaves_scores_untouched() {
    let mut s = vec![2.0, -1.0];
    let mut counts = vec![0; 2];
    apply_penalties(&mut s, &mut counts, &[0, 1], &SamplingParams::default());
    assert_eq!(s, vec![2.0, -1.0]);
}

#[test]
fn temperature_scales_differences() {
    let mut s = vec![1.0, 2.0, 4.0];
    apply_temperature(&mut s, 2.0);
    // Shifted by the max then halved: softmax-equivalent to [0.5, 1, 2].
    assert_close(&s, &[-1.5, -1.0, 0.0], TOL);

    // A tiny temperature sends everything but the maximum to huge negative values or -inf,
    // never to +inf or NaN, so the softmax stays one-hot on the maximum.
    for t in [1e-30, 1e-44] {
        let mut s = vec![1.0, 2.0, 4.0, f32::MAX];
        apply_temperature(&mut s, t);
        assert_eq!(s[3], 0.0);
        assert!(s[..3].iter().all(|&x| x < -1e29 && x.exp() == 0.0), "{s:?}");
    }
}

#[test]
fn log_sum_exp_and_argmax() {
    let v = [0.0f32, 3.0f32.ln()];
    assert!((log_sum_exp(&v) - 4.0f32.ln()).abs() < TOL);
    assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 2]), f32::NEG_INFINITY);
    // Large logits do not overflow; more than one chunk of lanes plus a remainder.
    let big = [1000.0f32; 19];
    assert!((log_sum_exp(&big) - (1000.0 + 19.0f32.ln())).abs() < 1e-3);

    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
    assert_eq!(argmax(&[]), None);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
}

#[test]
fn fast_exp_matches_libm() {
    // Relative error against f32::exp (itself within 1 ulp) over the whole useful range,
    // sampled densely; Cephes' expf is documented at ~2 ulp, i.e. ~2.4e-7.
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let (got, want) = (f64::from(fast_exp(x)), f64::from(x.exp()));
        worst = worst.max(((got - want) / want).abs());
        x += 0.001_37;
    }
    assert!(worst < 3e-7, "worst relative error {worst}");
    assert_eq!(fast_exp(0.0), 1.0);
    assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(fast_exp(-100.0), 0.0);
    assert!(fast_exp(100.0).is_finite());
}

#[test]
fn sum_exp_covers_every_element() {
    let xs: Vec<f32> = (0..21).map(|i| -(i as f32) * 0.1).collect();
    let want: f64 = xs.iter().map(|&x| f64::from(x).exp()).sum();
    // 21 terms, each within 3e-7 relative.
    assert!((sum_exp(&xs, 0.0) - want).abs() < 1e-5 * want);
    assert_eq!(max_of(&xs), 0.0);
}

#[test]
fn token_logprobs_per_row() {
    // Row 0: log_softmax([0, ln 3]) = [ln 1/4, ln 3/4]; row 1: uniform over 2.
    let logits = [0.0, 3.0f32.ln(), 5.0, 5.0];
    let lp = token_logprobs(&logits, 2, &[1, 0]);
    assert_close(&lp, &[0.75f32.ln(), 0.5f32.ln()], TOL);

    // A target outside the vocabulary or a missing row gives NaN, not a panic.
    let lp = token_logprobs(&logits, 2, &[2, 0, 1]);
    assert!(lp[0].is_nan());
    assert!((lp[1] - 0.5f32.ln()).abs() < TOL);
    assert!(lp[2].is_nan());
    assert!(token_logprobs(&logits, 0, &[0])[0].is_nan());
    assert!(token_logprobs(&logits, 2, &[]).is_empty());
}
