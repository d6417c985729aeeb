//! Engine tests on small synthetic adapters (the PEFT goldens live in `golden_tests.rs`).

use std::collections::BTreeMap;

use super::*;
use crate::SignMethod;
use crate::fixture::{AdapterFixture, LlamaShape};

fn module(r: usize, out: usize, inp: usize, salt: f32, scale: f64) -> LoraModule {
    let a = (0..r * inp)
        .map(|i| ((i as f32 + 1.0) * salt).sin())
        .collect();
    let b = (0..out * r)
        .map(|i| ((i as f32 + 0.5) * salt * 1.7).cos() * 0.5)
        .collect();
    LoraModule::new(
        "m",
        Matrix::new(r, inp, a).unwrap(),
        Matrix::new(out, r, b).unwrap(),
        scale,
    )
    .unwrap()
}

fn adapter(mods: &[(&str, LoraModule)], rank: usize, scale: f64) -> LoraAdapter {
    LoraAdapter::new(
        rank,
        scale,
        mods.iter()
            .map(|(n, m)| (n.to_string(), m.clone()))
            .collect(),
    )
}

/// `scale * B @ A` in f64.
fn delta(b: &Matrix, a: &Matrix, scale: f64) -> Vec<f64> {
    let (m, r) = b.shape();
    let n = a.cols();
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..r {
            let bv = f64::from(b.data()[i * r + p]) * scale;
            for j in 0..n {
                out[i * n + j] += bv * f64::from(a.data()[p * n + j]);
            }
        }
    }
    out
}

fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn two_adapters() -> (LoraAdapter, LoraAdapter) {
    let a = adapter(
        &[
            ("l.q", module(3, 5, 4, 0.3, 2.0)),
            ("l.v", module(3, 6, 4, 0.7, 2.0)),
        ],
        3,
        2.0,
    );
    let b = adapter(
        &[
            ("l.q", module(3, 5, 4, 1.1, 0.5)),
            ("l.o", module(3, 4, 4, 0.9, 0.5)),
        ],
        3,
        0.5,
    );
    (a, b)
}

#[test]
fn validation_errors() {
    let (a, b) = two_adapters();
    let both = [&a, &b];
    let lin = |w: Vec<f32>| MergeSpec::new(Strategy::Linear, w);
    assert_eq!(
        merge(&lin(vec![]), &[]).unwrap_err(),
        MergeError::NoComponents
    );
    assert!(matches!(
        merge(&lin(vec![1.0]), &both).unwrap_err(),
        MergeError::WeightCount { .. }
    ));
    assert!(matches!(
        merge(&lin(vec![1.0, f32::NAN]), &both).unwrap_err(),
        MergeError::NonFiniteWeight { index: 1, .. }
    ));
    let ties = MergeSpec::new(Strategy::Ties, vec![1.0, 1.0]);
    assert!(matches!(
        merge(&ties, &both).unwrap_err(),
        MergeError::DensityRequired { .. }
    ));
    assert!(matches!(
        merge(&ties.clone().with_density(1.5), &both).unwrap_err(),
        MergeError::DensityOutOfRange { .. }
    ));
    assert!(matches!(
        merge(&ties.clone().with_density(f32::NAN), &both).unwrap_err(),
        MergeError::DensityOutOfRange { .. }
    ));
    let cat_lorax = MergeSpec::new(Strategy::Cat, vec![1.0, 1.0]).with_semantics(Semantics::Lorax);
    assert!(matches!(
        merge(&cat_lorax, &both).unwrap_err(),
        MergeError::NotInLorax { .. }
    ));
    let svd0 = MergeSpec::new(Strategy::Svd, vec![1.0, 1.0]).with_svd_rank(0);
    assert_eq!(merge(&svd0, &both).unwrap_err(), MergeError::ZeroSvdRank);
    let empty = LoraAdapter::new(2, 1.0, BTreeMap::new());
    assert_eq!(
        merge(&lin(vec![1.0, 1.0]), &[&empty, &empty]).unwrap_err(),
        MergeError::NoModules
    );
}

#[test]
fn rank_and_shape_errors() {
    let a = adapter(&[("l.q", module(3, 5, 4, 0.3, 1.0))], 3, 1.0);
    let b = adapter(&[("l.q", module(2, 5, 4, 0.4, 1.0))], 2, 1.0);
    let err = merge(&MergeSpec::new(Strategy::Linear, vec![1.0, 1.0]), &[&a, &b]).unwrap_err();
    assert!(
        matches!(&err, MergeError::MixedRanks { module, ranks, .. } if module == "l.q" && ranks == &[3, 2])
    );
    assert!(err.to_string().contains("cat"));
    // cat and svd accept mixed ranks.
    assert!(merge(&MergeSpec::new(Strategy::Cat, vec![1.0, 1.0]), &[&a, &b]).is_ok());
    assert!(merge(&MergeSpec::new(Strategy::Svd, vec![1.0, 1.0]), &[&a, &b]).is_ok());
    let lorax = MergeSpec::new(Strategy::Linear, vec![1.0, 1.0]).with_semantics(Semantics::Lorax);
    assert!(matches!(
        merge(&lorax, &[&a, &b]).unwrap_err(),
        MergeError::MixedConfigRanks { .. }
    ));
    let c = adapter(&[("l.q", module(3, 6, 4, 0.4, 1.0))], 3, 1.0);
    assert!(matches!(
        merge(&MergeSpec::new(Strategy::Cat, vec![1.0, 1.0]), &[&a, &c]).unwrap_err(),
        MergeError::ShapeMismatch { component: 1, .. }
    ));
    let mut bad = module(3, 5, 4, 0.3, 1.0);
    bad = LoraModule::new(
        "m",
        bad.a().clone(),
        {
            let mut b = bad.b().clone();
            b.data_mut()[2] = f32::INFINITY;
            b
        },
        1.0,
    )
    .unwrap();
    let d = adapter(&[("l.q", bad)], 3, 1.0);
    assert!(matches!(
        merge(&MergeSpec::new(Strategy::Linear, vec![1.0, 1.0]), &[&a, &d]).unwrap_err(),
        MergeError::NonFiniteValue {
            component: 1,
            side: 'B',
            ..
        }
    ));
}

#[test]
fn cat_is_exact_and_svd_full_rank_matches_it() {
    let (a, b) = two_adapters();
    let w = vec![0.8f32, -1.3];
    let cat = merge(&MergeSpec::new(Strategy::Cat, w.clone()), &[&a, &b]).unwrap();
    assert_eq!(cat.scale, 1.0);
    // Exact reference: sum_i w_i s_i B_i A_i over the adapters that have the module.
    for (name, m) in &cat.modules {
        let mut want = vec![0.0; m.b.rows() * m.a.cols()];
        for (c, wi) in [(&a, w[0]), (&b, w[1])] {
            if let Some(x) = c.modules().get(name) {
                let d = delta(x.b(), x.a(), f64::from(wi) * x.scale());
                want.iter_mut().zip(d).for_each(|(o, v)| *o += v);
            }
        }
        let got = delta(&m.b, &m.a, 1.0);
        // f32 products of O(1) values: ~1e-7 relative.
        assert!(max_rel(&got, &want) < 1e-6, "{name}");
        // svd with rank = sum of ranks is exact as well.
    }
    let svd = merge(
        &MergeSpec::new(Strategy::Svd, w).with_svd_rank(6),
        &[&a, &b],
    )
    .unwrap();
    for (name, m) in &svd.modules {
        let c = &cat.modules[name];
        assert!(
            max_rel(&delta(&m.b, &m.a, 1.0), &delta(&c.b, &c.a, 1.0)) < 1e-6,
            "{name}"
        );
    }
}

#[test]
fn cross_term_illustration() {
    // merge-semantics.md §4: rank 1, (A1, B1) = (1, 2), (A2, B2) = (3, 1), w = [0.5, 0.5], s = 1.
    let one = |a: f32, b: f32| {
        let m = LoraModule::new(
            "x",
            Matrix::new(1, 1, vec![a]).unwrap(),
            Matrix::new(1, 1, vec![b]).unwrap(),
            1.0,
        )
        .unwrap();
        adapter(&[("x", m)], 1, 1.0)
    };
    let (c1, c2) = (one(1.0, 2.0), one(3.0, 1.0));
    let run = |s: Strategy, sem: Semantics| {
        let m = merge(
            &MergeSpec::new(s, vec![0.5, 0.5]).with_semantics(sem),
            &[&c1, &c2],
        )
        .unwrap();
        let x = &m.modules["x"];
        let d = delta(&x.b, &x.a, m.scale);
        d.iter().sum::<f64>()
    };
    assert!((run(Strategy::Cat, Semantics::Peft) - 2.5).abs() < 1e-6);
    assert!((run(Strategy::Linear, Semantics::Lorax) - 3.0).abs() < 1e-6);
    assert!((run(Strategy::Linear, Semantics::Peft) - 6.0).abs() < 1e-6);
    assert!((run(Strategy::Svd, Semantics::Peft) - 2.5).abs() < 1e-6);
}

#[test]
fn lorax_section_four_vectors_through_merge() {
    // The A sides of merge-semantics.md §4 as rank-2 adapters with in = 3 (B is irrelevant).
    let a_side = [
        [0.9f32, -0.1, 0.4, -0.5, 0.2, 0.05],
        [-0.3, 0.6, -0.2, 0.1, -0.7, 0.25],
        [0.2, -0.8, 0.15, -0.35, 0.45, -0.6],
    ];
    let comps: Vec<LoraAdapter> = a_side
        .iter()
        .map(|a| {
            let m = LoraModule::new(
                "x",
                Matrix::new(2, 3, a.to_vec()).unwrap(),
                Matrix::zeros(1, 2),
                2.0,
            )
            .unwrap();
            adapter(&[("x", m)], 2, 2.0)
        })
        .collect();
    let refs: Vec<&LoraAdapter> = comps.iter().collect();
    let w = vec![2.0f32, 0.3, 0.7];
    let lorax = |s: Strategy, m: SignMethod| {
        let spec = MergeSpec::new(s, w.clone())
            .with_density(0.5)
            .with_sign_method(m)
            .with_semantics(Semantics::Lorax);
        merge(&spec, &refs).unwrap()
    };
    // Tolerance 1e-6: f32 arithmetic on values given to 6-7 significant digits.
    let close = |got: &[f32], want: &[f32]| {
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?} vs {want:?}"
        )
    };
    let t = lorax(Strategy::Ties, SignMethod::Total);
    assert_eq!(t.scale, 2.0);
    close(
        t.modules["x"].a.data(),
        &[1.8, -0.56, 0.8, -1.0, -0.21, -0.42],
    );
    close(
        lorax(Strategy::Ties, SignMethod::Frequency).modules["x"]
            .a
            .data(),
        &[1.8, 0.18, 0.8, -1.0, 0.315, -0.42],
    );
    close(
        lorax(Strategy::Linear, SignMethod::Total).modules["x"]
            .a
            .data(),
        &[1.85, -0.58, 0.845, -1.215, 0.505, -0.245],
    );
    let peft = merge(
        &MergeSpec::new(Strategy::Ties, w.clone()).with_density(0.5),
        &refs,
    )
    .unwrap();
    assert_eq!(peft.scale, 1.0);
    let got = peft.modules["x"].a.data();
    let want = [1.8, -0.946573, 0.8, -1.0, -0.542218, -0.70993];
    assert!(
        got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 2e-6),
        "{got:?}"
    );
}

#[test]
fn lorax_density_goes_through_f32() {
    // 10 elements, d = 0.7: LoRAX keeps floor(f64(f32 0.7) * 10) = 6, PEFT keeps 7.
    let a: Vec<f32> = (1..=10).map(|i| i as f32).collect();
    let m = LoraModule::new(
        "x",
        Matrix::new(1, 10, a).unwrap(),
        Matrix::new(1, 1, vec![1.0]).unwrap(),
        1.0,
    )
    .unwrap();
    let c = adapter(&[("x", m)], 1, 1.0);
    let kept = |sem: Semantics| {
        let spec = MergeSpec::new(Strategy::Ties, vec![1.0, 1.0])
            .with_density(0.7)
            .with_semantics(sem);
        let out = merge(&spec, &[&c, &c]).unwrap();
        out.modules["x"]
            .a
            .data()
            .iter()
            .filter(|&&v| v != 0.0)
            .count()
    };
    assert_eq!(kept(Semantics::Lorax), 6);
    assert_eq!(kept(Semantics::Peft), 7);
}

#[test]
fn single_component() {
    let (a, _) = two_adapters();
    let peft = merge(
        &MergeSpec::new(Strategy::TiesSvd, vec![-0.5]).with_density(0.2),
        &[&a],
    )
    .unwrap();
    for (name, m) in &peft.modules {
        let x = &a.modules()[name];
        let want = delta(x.b(), x.a(), -0.5 * x.scale());
        assert!(max_rel(&delta(&m.b, &m.a, 1.0), &want) < 1e-6);
        assert_eq!(m.rank(), x.rank(), "forced to linear: rank unchanged");
    }
    let lorax = merge(
        &MergeSpec::new(Strategy::Ties, vec![9.0]).with_semantics(Semantics::Lorax),
        &[&a],
    )
    .unwrap();
    assert_eq!(lorax.scale, 2.0);
    assert_eq!(lorax.modules["l.q"].a, *a.modules()["l.q"].a());
}

#[test]
fn partial_modules_merge_over_present_components() {
    let (a, b) = two_adapters();
    let m = merge(&MergeSpec::new(Strategy::Linear, vec![0.6, 0.9]), &[&a, &b]).unwrap();
    assert_eq!(m.modules.keys().collect::<Vec<_>>(), ["l.o", "l.q", "l.v"]);
    // l.v only in a: plain c_0 B A.
    let x = &a.modules()["l.v"];
    let want = delta(x.b(), x.a(), 0.6 * 2.0);
    let got = &m.modules["l.v"];
    assert!(max_rel(&delta(&got.b, &got.a, 1.0), &want) < 1e-6);
}

fn tiny_components(n: u64) -> Vec<LoraAdapter> {
    let shapes = LlamaShape::tiny().module_shapes();
    (0..n)
        .map(|s| AdapterFixture::new(8, 100 + s).adapter(&shapes).unwrap())
        .collect()
}

#[test]
fn dare_at_density_one_equals_linear_and_ties() {
    let comps = tiny_components(3);
    let refs: Vec<&LoraAdapter> = comps.iter().collect();
    let w = vec![1.0f32, -0.4, 0.7];
    for sem in [Semantics::Peft, Semantics::Lorax] {
        let run = |s: Strategy| {
            merge(
                &MergeSpec::new(s, w.clone())
                    .with_density(1.0)
                    .with_seed(3)
                    .with_semantics(sem),
                &refs,
            )
            .unwrap()
        };
        assert_eq!(run(Strategy::DareLinear), run(Strategy::Linear));
        assert_eq!(run(Strategy::DareTies), run(Strategy::Ties));
    }
    let svd = |s: Strategy| merge(&MergeSpec::new(s, w.clone()).with_density(1.0), &refs).unwrap();
    assert_eq!(svd(Strategy::DareLinearSvd), svd(Strategy::Svd));
}

#[test]
fn dare_is_seeded_and_schedule_independent() {
    let comps = tiny_components(2);
    let refs: Vec<&LoraAdapter> = comps.iter().collect();
    let spec = MergeSpec::new(Strategy::DareTies, vec![1.0, 0.5])
        .with_density(0.3)
        .with_seed(42);
    let in_pool = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| merge(&spec, &refs).unwrap())
    };
    let one = in_pool(1);
    assert_eq!(one.content_hash(), in_pool(2).content_hash());
    assert_eq!(one.content_hash(), in_pool(3).content_hash());
    let other = merge(&spec.clone().with_seed(43), &refs).unwrap();
    assert_ne!(one.content_hash(), other.content_hash());
    // A module's masks do not depend on which other modules are merged.
    let mut only_q: Vec<LoraAdapter> = Vec::new();
    for c in &comps {
        let mods = c
            .modules()
            .iter()
            .filter(|(k, _)| k.ends_with("q_proj"))
            .map(|(k, v)| (k.clone(), v.clone()));
        only_q.push(LoraAdapter::new(
            c.config_rank(),
            c.config_scale(),
            mods.collect(),
        ));
    }
    let q_refs: Vec<&LoraAdapter> = only_q.iter().collect();
    let sub = merge(&spec, &q_refs).unwrap();
    for (k, v) in &sub.modules {
        assert_eq!(v, &one.modules[k]);
    }
}

#[test]
fn dare_statistics() {
    // One adapter pair with 64x2048-sized factors; the kept fraction of each tensor is
    // Binomial(N, d)/N with sd sqrt(d(1-d)/N). We check |kept - d| < 5 sd (false failure
    // probability < 1e-6 per tensor) and that every kept value is the original times 1/d.
    let (r, inp, out) = (64, 2048, 64);
    let mk = |salt: f32| {
        let a = (0..r * inp)
            .map(|i| ((i as f32 + 1.0) * salt).sin() + 2.0)
            .collect();
        let b = (0..out * r)
            .map(|i| ((i as f32 + 1.0) * salt).cos() + 2.0)
            .collect();
        LoraModule::new(
            "x",
            Matrix::new(r, inp, a).unwrap(),
            Matrix::new(out, r, b).unwrap(),
            1.0,
        )
        .unwrap()
    };
    let c0 = adapter(&[("x", mk(0.37))], r, 1.0);
    let zero = {
        let m = LoraModule::new("x", Matrix::zeros(r, inp), Matrix::zeros(out, r), 1.0).unwrap();
        adapter(&[("x", m)], r, 1.0)
    };
    for d in [0.1f32, 0.5, 0.9] {
        // Weight 1 on the real adapter, 0 on the zero one: PEFT per-side weights are 1 and 0.
        let spec = MergeSpec::new(Strategy::DareLinear, vec![1.0, 0.0])
            .with_density(d)
            .with_seed(7);
        let m = merge(&spec, &[&c0, &zero]).unwrap();
        let got = m.modules["x"].a.data();
        let orig = c0.modules()["x"].a().data();
        let kept = got.iter().filter(|&&v| v != 0.0).count();
        let n = got.len() as f64;
        let dd = f64::from(d);
        let sd = (dd * (1.0 - dd) / n).sqrt();
        assert!(
            ((kept as f64 / n) - dd).abs() < 5.0 * sd,
            "d {d}: kept {kept} of {n}"
        );
        for (g, o) in got.iter().zip(orig) {
            if *g != 0.0 {
                // PEFT >= 0.19: kept / d, computed as an f32 division.
                assert_eq!(*g, o / d);
            }
        }
        // The mean of the rescaled tensor estimates the original mean within 5 standard errors.
        let mean_o = orig.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = orig.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n;
        let se = (var * (1.0 - dd) / dd / n).sqrt();
        let mean_g = got.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        assert!(
            (mean_g - mean_o).abs() < 5.0 * se,
            "d {d}: mean {mean_g} vs {mean_o} (se {se})"
        );
        // LoRAX: same masks, no rescale.
        let lx = merge(
            &spec.clone().with_semantics(Semantics::Lorax),
            &[&c0, &zero],
        )
        .unwrap();
        for ((l, g), o) in lx.modules["x"].a.data().iter().zip(got).zip(orig) {
            assert_eq!(*l != 0.0, *g != 0.0);
            if *l != 0.0 {
                assert_eq!(l, o);
            }
        }
    }
}

#[test]
fn ties_svd_and_dare_svd_run_on_dense_paths() {
    let comps = tiny_components(2);
    let refs: Vec<&LoraAdapter> = comps.iter().collect();
    for s in [
        Strategy::TiesSvd,
        Strategy::DareTiesSvd,
        Strategy::DareLinearSvd,
        Strategy::MagnitudePruneSvd,
    ] {
        let spec = MergeSpec::new(s, vec![1.0, 0.5])
            .with_density(0.4)
            .with_svd_rank(4)
            .with_svd_clamp(0.99);
        let m = merge(&spec, &refs).unwrap();
        assert!(
            m.modules
                .values()
                .all(|x| x.rank() == 4 && x.a.is_finite() && x.b.is_finite())
        );
    }
}
