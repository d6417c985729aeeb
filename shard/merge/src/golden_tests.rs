//! Goldens from PEFT itself (`scripts/goldens/merge_goldens.py`): the committed PEFT-written
//! adapters under `tests/fixtures/adapters/` are read with [`crate::peft`], merged with
//! [`crate::merge`], and compared with PEFT 0.21.2's `add_weighted_adapter` outputs.
//!
//! Error measure, per tensor: `rel = max|x - y| / max(max|y|, 1e-30)` (max-norm relative error),
//! acceptance `rel <= 1e-5`. Element-wise relative error would be meaningless for entries that
//! are sums with cancellation (or pruned to ~0); the max-norm form bounds every entry's error by
//! a fraction of the tensor's scale. Both sides compute in f32 with at most a few terms per
//! entry, so honest agreement is ~1e-7; a wrong weight, scale, mask or sign is an O(1) error.
//! SVD cases compare the products `B @ A` (the factors are defined only up to signs/rotations)
//! computed in f64; PEFT's f32 LAPACK SVD versus our f64 SVD differ by about
//! `eps_f32 * sigma_1 / gap` with relative gaps >= 2.7% in these cases (reported by the script).

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::SafeTensors;
use serde::Deserialize;

use crate::peft::{PeftAdapter, read_adapter_dir};
use crate::{Matrix, MergeSpec, MergedAdapter, merge};

const TOLERANCE: f64 = 1e-5;

#[derive(Deserialize)]
struct Goldens {
    peft: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    adapters: Vec<String>,
    weights: Vec<f32>,
    strategy: String,
    compare: String,
    density: Option<f32>,
    majority_sign_method: String,
    svd_rank: Option<usize>,
    modules: usize,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn to64(m: &Matrix) -> Vec<f64> {
    m.data().iter().map(|&x| f64::from(x)).collect()
}

/// `m` zero-padded to `rows x cols` (PEFT pads `cat` to the total rank of all adapters).
fn padded(m: &Matrix, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..m.rows().min(rows) {
        for c in 0..m.cols().min(cols) {
            out[r * cols + c] = f64::from(m.data()[r * m.cols() + c]);
        }
    }
    out
}

fn product(b: &Matrix, a: &Matrix) -> Vec<f64> {
    let (m, r) = b.shape();
    let n = a.cols();
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..r {
            let bv = f64::from(b.data()[i * r + p]);
            for j in 0..n {
                out[i * n + j] += bv * f64::from(a.data()[p * n + j]);
            }
        }
    }
    out
}

fn golden_tensor(st: &SafeTensors<'_>, name: &str) -> Matrix {
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    let data = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Matrix::new(view.shape()[0], view.shape()[1], data).unwrap()
}

fn run_case(case: &Case, adapters: &BTreeMap<String, PeftAdapter>) -> MergedAdapter {
    let mut spec = MergeSpec::new(case.strategy.parse().unwrap(), case.weights.clone())
        .with_sign_method(case.majority_sign_method.parse().unwrap());
    spec.density = case.density;
    spec.svd_rank = case.svd_rank;
    let comps: Vec<_> = case.adapters.iter().map(|n| &adapters[n].adapter).collect();
    merge(&spec, &comps).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

#[test]
fn merges_match_peft_add_weighted_adapter() {
    let dir = fixtures();
    let meta: Goldens = serde_json::from_str(
        &std::fs::read_to_string(dir.join("goldens/merge_goldens.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta.peft, "0.21.2");
    let bytes = std::fs::read(dir.join("goldens/merge_goldens.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut adapters = BTreeMap::new();
    for case in &meta.cases {
        for name in &case.adapters {
            if !adapters.contains_key(name) {
                let a = read_adapter_dir(&dir.join("adapters").join(name))
                    .unwrap_or_else(|e| panic!("adapter {name}: {e}"));
                adapters.insert(name.clone(), a);
            }
        }
    }
    let mut worst = Vec::new();
    for case in &meta.cases {
        let merged = run_case(case, &adapters);
        assert_eq!(
            merged.modules.len(),
            case.modules,
            "{}: module set",
            case.name
        );
        let mut case_worst = 0.0f64;
        for (path, m) in &merged.modules {
            let ga = golden_tensor(&st, &format!("{}/{path}/A", case.name));
            let gb = golden_tensor(&st, &format!("{}/{path}/B", case.name));
            let errs = if case.compare == "product" {
                vec![rel_err(&product(&m.b, &m.a), &product(&gb, &ga))]
            } else {
                vec![
                    rel_err(&padded(&m.a, ga.rows(), ga.cols()), &to64(&ga)),
                    rel_err(&padded(&m.b, gb.rows(), gb.cols()), &to64(&gb)),
                ]
            };
            for e in errs {
                assert!(
                    e <= TOLERANCE,
                    "{} {path}: relative error {e:.3e} > {TOLERANCE:e}",
                    case.name
                );
                case_worst = case_worst.max(e);
            }
        }
        worst.push(format!("{}: {case_worst:.2e}", case.name));
    }
    // Visible with --nocapture: the worst error per case.
    println!("{}", worst.join("\n"));
}
