//! Tests of the warpers against hand-computed values and, on large vocabularies, against
//! straightforward full-sort reference implementations.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hand-computed values below come from f32 inputs through a few f32 operations; 1e-6
/// absolute is far above their rounding and far below any real error.
const TOL: f32 = 1e-6;

fn kept(c: &Candidates, scores: &[f32]) -> Vec<u32> {
    let mut ids = Vec::new();
    c.for_each(scores, |id, _| ids.push(id));
    ids.sort_unstable();
    ids
}

fn all() -> Candidates {
    let mut c = Candidates::default();
    c.reset();
    c
}

fn random_logits(vocab: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..vocab)
        .map(|_| (rng.random::<f32>() - 0.5) * scale)
        .collect()
}

#[test]
fn top_k_keeps_k_largest_and_ties_at_the_threshold() {
    let s = [1.0, 3.0, 2.0, 3.0];
    let mut c = all();
    c.top_k(&s, 2);
    assert_eq!(kept(&c, &s), vec![1, 3]);

    // As in HF, every token tied with the k-th score stays.
    let s = [3.0, 1.0, 3.0];
    let mut c = all();
    c.top_k(&s, 1);
    assert_eq!(kept(&c, &s), vec![0, 2]);

    for k in [0, 3, 10] {
        let mut c = all();
        c.top_k(&s, k);
        assert_eq!(kept(&c, &s), vec![0, 1, 2], "k = {k}");
    }
}

/// ids 2, 0, 3, 1 have probabilities 0.5, 0.3, 0.15, 0.05.
fn four_token_scores() -> [f32; 4] {
    [0.3f32.ln(), 0.05f32.ln(), 0.5f32.ln(), 0.15f32.ln()]
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
    let s = four_token_scores();
    let cases: [(f32, &[u32]); 6] = [
        (1e-6, &[2]),
        (0.45, &[2]),
        (0.7, &[0, 2]),
        (0.9, &[0, 2, 3]),
        (0.96, &[0, 1, 2, 3]),
        (1.0, &[0, 1, 2, 3]),
    ];
    for (p, want) in cases {
        let mut c = all();
        c.top_p(&s, p);
        assert_eq!(kept(&c, &s), want, "top_p = {p}");
    }
}

#[test]
fn top_p_renormalises_over_the_top_k_survivors() {
    // After top-k 2 the survivors 2 and 0 have probabilities 0.625 and 0.375.
    let s = four_token_scores();
    let mut c = all();
    c.top_k(&s, 2);
    c.top_p(&s, 0.6);
    assert_eq!(kept(&c, &s), vec![2]);
    let mut c = all();
    c.top_k(&s, 2);
    c.top_p(&s, 0.63);
    assert_eq!(kept(&c, &s), vec![0, 2]);
}

#[test]
fn typical_p_keeps_tokens_closest_to_the_entropy() {
    // p = [0.7, 0.2, 0.1]: H = 0.80182, |-ln p - H| = [0.44515, 0.80762, 1.50077].
    let s = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
    let cases: [(f32, &[u32]); 4] = [
        (0.5, &[0]),
        (0.8, &[0, 1]),
        (0.95, &[0, 1, 2]),
        (1e-6, &[0]),
    ];
    for (mass, want) in cases {
        let mut c = all();
        c.typical_p(&s, mass);
        assert_eq!(kept(&c, &s), want, "typical_p = {mass}");
    }
}

#[test]
fn typical_p_can_drop_the_most_likely_token() {
    // p = [0.4, 0.3, 0.3]: H = 1.08890, distances [0.17261, 0.11514, 0.11514]; the two
    // 0.3 tokens come first and reach mass 0.5 together, so the argmax is removed.
    let s = [0.4f32.ln(), 0.3f32.ln(), 0.3f32.ln()];
    let mut c = all();
    c.typical_p(&s, 0.5);
    assert_eq!(kept(&c, &s), vec![1, 2]);
    // With mass 0.2 the crossing is at the first 0.3 token; its tie stays too.
    let mut c = all();
    c.typical_p(&s, 0.2);
    assert_eq!(kept(&c, &s), vec![1, 2]);
}

#[test]
fn typical_p_keeps_a_whole_tie_group() {
    // p = [0.5, 0.25, 0.25]: every |-ln p - H| equals 0.5 ln 2, so all tie and all stay.
    let s = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
    let mut c = all();
    c.typical_p(&s, 0.1);
    assert_eq!(kept(&c, &s), vec![0, 1, 2]);
}

#[test]
fn top_n_orders_by_probability_then_id() {
    let s = [1.0, 3.0, 2.0, 3.0, 0.0];
    let log_z = log_sum_exp(&s);
    let mut c = all();
    let top = c.top_n(&s, 3, log_z);
    let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![1, 3, 2]);
    assert!((top[2].1 - (2.0 - log_z)).abs() < TOL);
    let mut c = all();
    assert_eq!(c.top_n(&s, 100, log_z).len(), 5);
    let mut c = all();
    assert!(c.top_n(&s, 0, log_z).is_empty());
}

/// Reference nucleus set: full descending sort (ties by id), then the same per-token
/// arithmetic as the implementation, so only the chunked ordering is under test.
fn reference_top_p(s: &[f32], p: f32) -> Vec<u32> {
    let lz = log_sum_exp(s);
    let mut ids: Vec<u32> = (0..s.len() as u32).collect();
    ids.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
    let mut mass = 0.0;
    let mut out = Vec::new();
    for id in ids {
        out.push(id);
        mass += f64::from(fast_exp(s[id as usize] - lz));
        if mass >= f64::from(p) {
            break;
        }
    }
    out.sort_unstable();
    out
}

/// Reference typical set, written directly from HF's `TypicalLogitsWarper`.
fn reference_typical(s: &[f32], mass: f32) -> Vec<u32> {
    let lz = f64::from(log_sum_exp(s));
    let lp: Vec<f64> = s.iter().map(|&x| f64::from(x) - lz).collect();
    let h: f64 = -lp.iter().map(|&l| l.exp() * l).sum::<f64>();
    let key: Vec<f32> = lp.iter().map(|&l| (-l - h).abs() as f32).collect();
    let mut ids: Vec<usize> = (0..s.len()).collect();
    ids.sort_by(|&a, &b| key[a].total_cmp(&key[b]).then(a.cmp(&b)));
    let mut cum = 0.0;
    let mut last = ids.len() - 1;
    for (pos, &id) in ids.iter().enumerate() {
        cum += lp[id].exp();
        if cum >= f64::from(mass) {
            last = pos;
            break;
        }
    }
    let threshold = key[ids[last]];
    (0..s.len() as u32)
        .filter(|&i| key[i as usize] <= threshold)
        .collect()
}

#[test]
fn chunked_top_p_matches_full_sort_on_a_large_vocabulary() {
    // Scale 12 spreads the nucleus over thousands of tokens and several bands, each walked in
    // several chunks.
    for (seed, p) in [(1, 0.5), (2, 0.9), (3, 0.99), (4, 0.999_9)] {
        let s = random_logits(32_000, seed, 12.0);
        let mut c = all();
        c.top_p(&s, p);
        assert!(
            c.len(s.len()) > FIRST_CHUNK,
            "seed {seed}: {} kept",
            c.len(s.len())
        );
        assert_eq!(
            kept(&c, &s),
            reference_top_p(&s, p),
            "seed {seed}, top_p {p}"
        );
    }
}

#[test]
fn chunked_typical_p_matches_reference_on_a_large_vocabulary() {
    for (seed, mass) in [(5, 0.2), (6, 0.9), (7, 0.999)] {
        let s = random_logits(32_000, seed, 12.0);
        let mut c = all();
        c.typical_p(&s, mass);
        // f32 vs f64 keys could only differ at an exact tie; none occur with these seeds.
        assert_eq!(
            kept(&c, &s),
            reference_typical(&s, mass),
            "seed {seed}, mass {mass}"
        );
    }
}

#[test]
fn top_p_on_a_peaked_distribution_stays_in_the_first_band() {
    // Three dominant tokens over a flat tail of 50k: the nucleus is those three.
    let mut s = random_logits(50_000, 8, 1.0);
    s[7] = 20.0;
    s[40_000] = 19.5;
    s[123] = 19.0;
    let mut c = all();
    c.top_p(&s, 0.9);
    assert_eq!(kept(&c, &s), vec![7, 123, 40_000]);
    assert_eq!(kept(&c, &s), reference_top_p(&s, 0.9));
    // The kept list is in descending order, so top-n reads its front.
    let top = c.top_n(&s, 2, 0.0);
    assert_eq!(top, vec![(7, 20.0), (40_000, 19.5)]);
}

#[test]
fn scan_and_select_paths_agree() {
    // Coarse values so that ties occur; k and n on both sides of SCAN_LIMIT.
    let s: Vec<f32> = random_logits(5_000, 9, 8.0)
        .iter()
        .map(|x| x.round())
        .collect();
    for k in [1, 7, SCAN_LIMIT, SCAN_LIMIT + 1, 1_000] {
        let mut scan = all();
        scan.top_k(&s, k);
        let threshold = {
            let mut sorted = s.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        };
        let want: Vec<u32> = (0..s.len() as u32)
            .filter(|&i| s[i as usize] >= threshold)
            .collect();
        assert_eq!(kept(&scan, &s), want, "top_k {k}");
    }
    let log_z = log_sum_exp(&s);
    for n in [1, 5, SCAN_LIMIT, SCAN_LIMIT + 3] {
        let fast = all().top_n(&s, n, log_z);
        let mut listed = all();
        listed.materialize(s.len());
        let slow = listed.top_n(&s, n, log_z);
        assert_eq!(fast, slow, "top_n {n}");
        assert_eq!(fast.len(), n);
        assert!(
            fast.windows(2)
                .all(|w| w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0))
        );
    }
}

#[test]
fn sample_inverts_the_cumulative_distribution() {
    // Weights 1, 3 over ids 0, 1 (scores 0 and ln 3): u < 1/4 picks 0, else 1.
    let s = [0.0, 3.0f32.ln(), -1e30];
    let mut c = all();
    c.top_k(&s, 2);
    for (u, want) in [(0.0, 0), (0.24, 0), (0.26, 1), (0.999_999, 1)] {
        let (id, log_z) = c.sample(&s, u).expect("non-empty");
        assert_eq!(id, want, "u = {u}");
        assert!((log_z - 4.0f32.ln()).abs() < TOL);
    }
    // Tokens with weight 0 (here a -inf score) are never drawn, even at u -> 1.
    let s = [0.0, f32::NEG_INFINITY];
    assert_eq!(all().sample(&s, 0.999_999_999).map(|r| r.0), Some(0));
    let mut empty = all();
    empty.materialize(0);
    assert_eq!(empty.sample(&[], 0.5), None);
}
