//! Tests of the sampler: goldens from `transformers`, greedy and sampled choices, reported
//! logprobs, seeded reproducibility and the sampled frequencies.

use super::*;
use crate::generation::token_logprobs;

fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params).expect("valid params")
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        do_sample: true,
        seed,
        ..SamplingParams::default()
    }
}

fn random_logits(vocab: usize, rng: &mut ChaCha8Rng, scale: f32) -> Vec<f32> {
    (0..vocab)
        .map(|_| (rng.random::<f32>() - 0.5) * scale)
        .collect()
}

/// Golden cases written by `testdata/hf_warpers.py` (transformers 4.57.6, torch 2.15).
#[derive(serde::Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    name: String,
    logits: Vec<f32>,
    history: Vec<u32>,
    repetition_penalty: f32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    typical_p: f32,
    logprobs: Vec<Option<f32>>,
}

#[test]
fn processed_distribution_matches_transformers() {
    let golden: Golden =
        serde_json::from_str(include_str!("testdata/hf_warpers.json")).expect("golden json");
    assert!(golden.cases.len() >= 10);
    for case in golden.cases {
        let params = SamplingParams {
            temperature: case.temperature,
            top_k: case.top_k,
            top_p: case.top_p,
            typical_p: case.typical_p,
            repetition_penalty: case.repetition_penalty,
            do_sample: true,
            ..SamplingParams::default()
        };
        let mut s = sampler(params);
        s.prepare(&case.logits, &case.history);
        s.warp();
        let log_z = s.candidates.log_normalizer(&s.scores);
        let mut got = vec![None; case.logits.len()];
        s.candidates.for_each(&s.scores, |id, score| {
            got[id as usize] = Some(score - log_z)
        });
        for (id, (g, w)) in got.iter().zip(&case.logprobs).enumerate() {
            match (g, w) {
                // torch works in f32 throughout, we accumulate sums in f64: logits are O(10),
                // so the two differ by a few f32 ulps of 10 (~1e-6); 2e-5 leaves margin.
                (Some(g), Some(w)) => {
                    assert!((g - w).abs() < 2e-5, "{} id {id}: {g} vs {w}", case.name)
                }
                (None, None) => {}
                _ => panic!(
                    "{} id {id}: kept mismatch, ours {g:?}, transformers {w:?}",
                    case.name
                ),
            }
        }
    }
}

#[test]
fn greedy_takes_the_argmax_with_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::default());
    assert!(s.is_greedy());
    let logits = [0.5, 2.0, 2.0, -1.0];
    let out = s.next(&logits, &[], 0);
    assert_eq!(out.id, 1);
    let want = token_logprobs(&logits, 4, &[1])[0];
    assert!((out.logprob - want).abs() < 1e-6);
    assert!(out.top.is_empty());
    // The infallible constructor is the same sampler.
    let mut g = Sampler::greedy();
    assert!(g.is_greedy() && *g.params() == SamplingParams::default());
    let again = g.next(&logits, &[], 0);
    assert_eq!(
        (again.id, again.logprob.to_bits()),
        (out.id, out.logprob.to_bits())
    );
}

#[test]
fn greedy_top_n_lists_the_full_distribution() {
    let mut s = sampler(SamplingParams::default());
    let logits = [0.5, 2.0, 2.0, -1.0, 1.0];
    let out = s.next(&logits, &[], 3);
    let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![1, 2, 4]);
    for &(id, got) in &out.top {
        let want = token_logprobs(&logits, 5, &[id])[0];
        assert!((got - want).abs() < 1e-6, "id {id}: {got} vs {want}");
    }
    assert_eq!(out.top[0].1, out.logprob);
}

#[test]
fn penalties_change_the_greedy_choice_and_its_logprob() {
    // 2.0 / 1.25 = 1.6 < 1.9, so the repeated token 0 loses.
    let params = SamplingParams {
        repetition_penalty: 1.25,
        ..SamplingParams::default()
    };
    let mut s = sampler(params);
    let out = s.next(&[2.0, 1.9], &[0, 0], 2);
    assert_eq!(out.id, 1);
    let want = token_logprobs(&[1.6, 1.9], 2, &[1])[0];
    assert!((out.logprob - want).abs() < 1e-6);
    assert_eq!(out.top.len(), 2);
    // The scratch counts are reset: the next step without history is unpenalised.
    assert_eq!(s.next(&[2.0, 1.9], &[], 0).id, 0);
}

#[test]
fn temperature_zero_is_greedy_even_with_do_sample() {
    let params = SamplingParams {
        temperature: 0.0,
        do_sample: true,
        top_k: 2,
        seed: 3,
        ..Default::default()
    };
    let mut s = sampler(params);
    assert!(s.is_greedy());
    for _ in 0..20 {
        assert_eq!(s.next(&[0.0, 0.1, -0.2], &[], 0).id, 1);
    }
}

#[test]
fn tiny_top_p_samples_the_argmax() {
    let params = SamplingParams {
        top_p: 1e-6,
        seed: 11,
        ..SamplingParams::default()
    };
    let mut s = sampler(params);
    assert!(!s.is_greedy());
    for _ in 0..50 {
        let out = s.next(&[0.0, 0.3, 0.2, 0.29], &[], 5);
        assert_eq!(out.id, 1);
        // The nucleus holds one token: its logprob is 0 and it is the only alternative.
        assert_eq!(out.logprob, 0.0);
        assert_eq!(out.top, vec![(1, 0.0)]);
    }
}

#[test]
fn logprob_is_taken_after_the_warpers() {
    // top_k 2 keeps ids 1 and 0 (probabilities 3/4 and 1/4 after renormalisation).
    let params = SamplingParams {
        top_k: 2,
        seed: 5,
        ..SamplingParams::default()
    };
    let mut s = sampler(params);
    let logits = [0.0, 3.0f32.ln(), -5.0];
    for _ in 0..20 {
        let out = s.next(&logits, &[], 3);
        let want = if out.id == 1 {
            0.75f32.ln()
        } else {
            0.25f32.ln()
        };
        assert!(out.id < 2);
        assert!((out.logprob - want).abs() < 1e-6, "{out:?}");
        assert_eq!(out.top.len(), 2);
        assert_eq!(out.top[0].0, 1);
        assert!((out.top[0].1 - 0.75f32.ln()).abs() < 1e-6);
    }
}

#[test]
fn same_seed_same_samples_different_seed_differs() {
    let vocab = 1000;
    let mut data = ChaCha8Rng::seed_from_u64(99);
    let steps: Vec<Vec<f32>> = (0..64)
        .map(|_| random_logits(vocab, &mut data, 2.0))
        .collect();
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 500,
        top_p: 0.95,
        repetition_penalty: 1.1,
        ..sampling(1234)
    };
    let run = |params: SamplingParams| {
        let mut s = sampler(params);
        let mut history = vec![5u32, 6, 7];
        let mut out = Vec::new();
        for logits in &steps {
            let sample = s.next(logits, &history, 3);
            history.push(sample.id);
            out.push(sample);
        }
        out
    };
    let a = run(params);
    let b = run(params);
    assert_eq!(a, b);
    let c = run(SamplingParams {
        seed: 1235,
        ..params
    });
    let same = a.iter().zip(&c).filter(|(x, y)| x.id == y.id).count();
    assert!(same < 16, "seeds 1234 and 1235 agree on {same} of 64 steps");
}

/// Draws `n` tokens from `logits` and returns the counts per id.
fn histogram(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    let mut s = sampler(params);
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        counts[s.next(logits, &[], 0).id as usize] += 1;
    }
    counts
}

/// Pearson's chi-square statistic of `counts` against probabilities `p`.
fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(p)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|&v| f64::from(v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[test]
fn samples_follow_softmax_frequencies() {
    let logits = [0.0, 1.0, -1.0, 2.0, 0.5, -0.5];
    let counts = histogram(sampling(2024), &logits, 60_000);
    // df = 5; the 0.1% critical value of chi-square(5) is 20.52. The seed is fixed, so this is
    // deterministic; a biased sampler (e.g. off-by-one in the inverse CDF) scores in the
    // hundreds or more.
    let stat = chi_square(&counts, &softmax(&logits));
    assert!(stat < 20.52, "chi-square {stat}, counts {counts:?}");
}

#[test]
fn samples_follow_the_warped_distribution() {
    // Temperature 0.5 then top-k 3: the survivors are ids 3, 1, 4 with softmax(2x) weights.
    let logits = [0.0, 1.0, -1.0, 2.0, 0.5, -0.5];
    let params = SamplingParams {
        temperature: 0.5,
        top_k: 3,
        ..sampling(77)
    };
    let counts = histogram(params, &logits, 40_000);
    assert_eq!(counts[0] + counts[2] + counts[5], 0, "{counts:?}");
    let kept = [counts[1], counts[3], counts[4]];
    let p = softmax(&[2.0, 4.0, 1.0]);
    // df = 2; 0.1% critical value 13.82.
    let stat = chi_square(&kept, &p);
    assert!(stat < 13.82, "chi-square {stat}, counts {counts:?}");
}

#[test]
fn large_vocabulary_step_with_every_warper() {
    let vocab = 128_256;
    let mut data = ChaCha8Rng::seed_from_u64(7);
    let logits = random_logits(vocab, &mut data, 8.0);
    let history: Vec<u32> = (0..2048).map(|i| (i * 61) % vocab as u32).collect();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        typical_p: 0.95,
        repetition_penalty: 1.1,
        frequency_penalty: 0.2,
        presence_penalty: 0.1,
        ..sampling(42)
    };
    let out = sampler(params).next(&logits, &history, 5);
    assert!(out.logprob.is_finite() && out.logprob <= 0.0);
    assert_eq!(out.top.len(), 5);
    assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
    // Same seed, every alternative: the same draw, from at most top_k tokens whose
    // probabilities sum to 1 (f32 logprobs summed in f64: 1e-5 covers 50 rounding errors).
    let all = sampler(params).next(&logits, &history, usize::MAX);
    assert_eq!(all.id, out.id);
    assert_eq!(all.top[..5], out.top[..]);
    assert!(all.top.len() <= 50);
    assert!(
        all.top
            .iter()
            .any(|&(id, lp)| id == out.id && lp == out.logprob)
    );
    let mass: f64 = all.top.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
    assert!((mass - 1.0).abs() < 1e-5, "mass {mass}");
}

#[test]
fn degenerate_logits_do_not_panic() {
    let mut s = sampler(sampling(1));
    let out = s.next(&[], &[], 3);
    assert_eq!(out.id, 0);
    assert!(out.logprob.is_nan());

    // All NaN: treated as uniform.
    let out = s.next(&[f32::NAN; 4], &[1, 2, 99], 2);
    assert!(out.id < 4);
    assert!((out.logprob - 0.25f32.ln()).abs() < 1e-6);

    // +inf dominates.
    let mut g = sampler(SamplingParams::default());
    assert_eq!(g.next(&[0.0, f32::INFINITY, 1.0], &[], 0).id, 1);
}

#[test]
fn invalid_params_are_rejected() {
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::default()
    };
    assert!(matches!(Sampler::new(bad), Err(SamplingError::TopP(_))));
}
