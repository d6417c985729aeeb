//! The selector's parsing, validation and errors.

use std::path::PathBuf;

use super::*;

/// The adapter fields of a request, owned (what the router's request type carries).
#[derive(Debug, Clone, Default)]
struct GenerateParameters {
    adapter_id: Option<String>,
    adapter_source: Option<String>,
    api_token: Option<String>,
    merged_adapters: Option<MergedAdapters>,
}

fn policy() -> AdapterPolicy {
    AdapterPolicy {
        max_merge_adapters: 3,
        adapter_roots: vec![PathBuf::from("/srv/adapters")],
        default_source: AdapterSource::Hub,
        merge_semantics: Semantics::Peft,
        served_model_id: "org/base".into(),
    }
}

fn single(id: &str, source: Option<&str>) -> GenerateParameters {
    GenerateParameters {
        adapter_id: Some(id.into()),
        adapter_source: source.map(String::from),
        ..Default::default()
    }
}

fn merged(m: MergedAdapters) -> GenerateParameters {
    GenerateParameters {
        merged_adapters: Some(m),
        ..Default::default()
    }
}

fn two(strategy: Option<&str>, density: Option<f32>) -> MergedAdapters {
    MergedAdapters {
        ids: Some(vec!["org/a".into(), "org/b".into()]),
        weights: Some(vec![1.0, 0.5]),
        merge_strategy: strategy.map(String::from),
        density,
        ..Default::default()
    }
}

fn resolve_adapter(p: &GenerateParameters, policy: &AdapterPolicy) -> Result<AdapterSpec, E> {
    let selector = AdapterSelector {
        adapter_id: p.adapter_id.as_deref(),
        adapter_source: p.adapter_source.as_deref(),
        api_token: p.api_token.as_deref(),
        merged_adapters: p.merged_adapters.as_ref(),
    };
    resolve_selector(selector, policy)
}

fn resolve(p: GenerateParameters) -> Result<AdapterSpec, E> {
    resolve_adapter(&p, &policy())
}

fn err(p: GenerateParameters) -> E {
    match resolve(p) {
        Err(e) => e,
        other => panic!("expected an adapter error, got {other:?}"),
    }
}

#[test]
fn base_model_spellings_resolve_to_base() {
    for id in [
        None,
        Some(""),
        Some(BASE_MODEL_ADAPTER_ID),
        Some("org/base"),
    ] {
        let p = GenerateParameters {
            adapter_id: id.map(String::from),
            ..Default::default()
        };
        assert_eq!(resolve(p).unwrap(), AdapterSpec::Base, "{id:?}");
    }
}

#[test]
fn single_adapters_resolve_with_source_and_token() {
    let mut p = single("org/lora", Some("HUB"));
    p.api_token = Some("tok".into());
    let AdapterSpec::Single(r) = resolve(p).unwrap() else {
        panic!("single")
    };
    assert_eq!(
        (r.id.as_str(), r.source, r.api_token.as_deref()),
        ("org/lora", AdapterSource::Hub, Some("tok"))
    );
    let AdapterSpec::Single(r) = resolve(single("./team/./lora/", Some("local"))).unwrap() else {
        panic!("single")
    };
    assert_eq!(
        (r.id.as_str(), r.source),
        ("team/lora", AdapterSource::Local)
    );
    let AdapterSpec::Single(r) = resolve(single("/srv/adapters/x", Some("local"))).unwrap() else {
        panic!("single")
    };
    assert_eq!(r.id, "/srv/adapters/x");
}

#[test]
fn s3_ids_are_checked_and_normalised() {
    let AdapterSpec::Single(r) = resolve(single("s3://bucket/team/sql/", Some("S3"))).unwrap()
    else {
        panic!("single")
    };
    assert_eq!(
        (r.id.as_str(), r.source),
        ("s3://bucket/team/sql", AdapterSource::S3)
    );
    // Every component of a merge follows the request's source.
    let mut p = GenerateParameters {
        adapter_source: Some("s3".into()),
        merged_adapters: Some(MergedAdapters {
            ids: Some(vec!["s3://b1c/a".into(), "s3://b2c/b/".into()]),
            weights: Some(vec![1.0, 1.0]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let AdapterSpec::Merged(m) = resolve(p.clone()).unwrap() else {
        panic!("merged")
    };
    let ids: Vec<&str> = m.components.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["s3://b1c/a", "s3://b2c/b"]);
    if let Some(m) = p.merged_adapters.as_mut() {
        m.ids = Some(vec!["s3://b1c/a".into(), "org/name".into()]);
    }
    assert!(matches!(err(p), E::InvalidS3Id { id, .. } if id == "org/name"));
    for bad in [
        "org/name",
        "s3://bucket",
        "s3://Bad_Bucket/x",
        "s3://bucket/a/../b",
    ] {
        let e = err(single(bad, Some("s3")));
        assert!(
            matches!(&e, E::InvalidS3Id { id, .. } if id == bad),
            "{bad}: {e}"
        );
    }
    // The wire check accepts what validation produced.
    assert_eq!(
        check_id_shape(AdapterSource::S3, "s3://bucket/x"),
        Ok("s3://bucket/x")
    );
    assert!(check_id_shape(AdapterSource::S3, "bucket/x").is_err());
}

#[test]
fn adapter_ids_are_checked() {
    assert_eq!(
        resolve(GenerateParameters {
            adapter_id: Some("x".into()),
            merged_adapters: Some(two(None, None)),
            ..Default::default()
        })
        .unwrap_err(),
        E::ConflictingAdapters
    );
    for bad in [
        "../etc", "/abs", "a/b/c", "a--b", "a..b", "-a", "a b", "org/",
    ] {
        assert_eq!(err(single(bad, None)), E::InvalidHubId(bad.into()), "{bad}");
    }
    for bad in ["../x", "a/../../x", ".", "/srv/adapters/../etc"] {
        assert_eq!(
            err(single(bad, Some("local"))),
            E::EscapesRoot(bad.into()),
            "{bad}"
        );
    }
    assert_eq!(
        err(single("/etc/lora", Some("local"))),
        E::OutsideRoots("/etc/lora".into())
    );
    assert_eq!(
        err(single("/srv/adapters-evil/x", Some("local"))),
        E::OutsideRoots("/srv/adapters-evil/x".into()),
        "roots match whole components"
    );
    let no_roots = AdapterPolicy {
        adapter_roots: vec![],
        ..policy()
    };
    assert_eq!(
        resolve_adapter(&single("x", Some("local")), &no_roots).unwrap_err(),
        E::LocalDisabled("x".into())
    );
    assert!(matches!(err(single("x", Some("gcs"))), E::UnknownSource(_)));
}

#[test]
fn merges_are_checked() {
    let cases: Vec<(MergedAdapters, E)> = vec![
        (
            MergedAdapters {
                ids: Some(vec![]),
                ..Default::default()
            },
            E::EmptyMerge,
        ),
        (MergedAdapters::default(), E::EmptyMerge),
        (
            MergedAdapters {
                ids: Some(vec!["a".into(); 4]),
                weights: Some(vec![1.0; 4]),
                ..Default::default()
            },
            E::TooManyAdapters { max: 3, given: 4 },
        ),
        (
            MergedAdapters {
                weights: Some(vec![1.0]),
                ..two(None, None)
            },
            E::WeightCount { ids: 2, weights: 1 },
        ),
        (
            MergedAdapters {
                weights: None,
                ..two(None, None)
            },
            E::WeightCount { ids: 2, weights: 0 },
        ),
        (
            MergedAdapters {
                weights: Some(vec![1.0, f32::INFINITY]),
                ..two(None, None)
            },
            E::NonFiniteWeight {
                index: 1,
                value: f32::INFINITY,
            },
        ),
        (
            MergedAdapters {
                ids: Some(vec!["org/a".into(), BASE_MODEL_ADAPTER_ID.into()]),
                ..two(None, None)
            },
            E::BaseInMerge(BASE_MODEL_ADAPTER_ID.into()),
        ),
        (
            MergedAdapters {
                ids: Some(vec!["org/base".into(), "org/a".into()]),
                ..two(None, None)
            },
            E::BaseInMerge("org/base".into()),
        ),
        (
            MergedAdapters {
                ids: Some(vec!["org/a".into(), String::new()]),
                ..two(None, None)
            },
            E::EmptyId,
        ),
        (
            two(Some("ties"), None),
            E::MissingDensity { strategy: "ties" },
        ),
        (
            two(Some("DARE_linear_SVD"), None),
            E::MissingDensity {
                strategy: "dare_linear_svd",
            },
        ),
        (two(Some("ties"), Some(1.5)), E::DensityRange(1.5)),
        (two(Some("linear"), Some(-0.1)), E::DensityRange(-0.1)),
        (
            MergedAdapters {
                svd_rank: Some(0),
                ..two(Some("svd"), None)
            },
            E::SvdRank,
        ),
        (
            MergedAdapters {
                svd_clamp: Some(1.5),
                ..two(Some("svd"), None)
            },
            E::SvdClampRange(1.5),
        ),
    ];
    for (m, expected) in cases {
        assert_eq!(err(merged(m.clone())), expected, "{m:?}");
    }
    let nan = err(merged(MergedAdapters {
        weights: Some(vec![f32::NAN, 1.0]),
        ..two(None, None)
    }));
    assert!(matches!(nan, E::NonFiniteWeight { index: 0, value } if value.is_nan()));
    let nan = err(merged(two(Some("ties"), Some(f32::NAN))));
    assert!(matches!(nan, E::DensityRange(d) if d.is_nan()));
    let unknown = err(merged(two(Some("slerp"), None)));
    assert_eq!(
        unknown.to_string(),
        "`merged_adapters.merge_strategy`: unknown merge strategy 'slerp'; valid values: linear, ties, dare_linear, dare_ties, magnitude_prune, cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd"
    );
    let unknown = err(merged(MergedAdapters {
        majority_sign_method: Some("majority".into()),
        ..two(None, None)
    }));
    assert_eq!(
        unknown.to_string(),
        "`merged_adapters.majority_sign_method`: unknown majority sign method 'majority'; valid values: total, frequency"
    );
}

#[test]
fn merges_resolve_to_canonical_specs() {
    let AdapterSpec::Merged(m) = resolve(merged(MergedAdapters {
        majority_sign_method: Some("Frequency".into()),
        ..two(Some("TIES"), Some(0.2))
    }))
    .unwrap() else {
        panic!("merged")
    };
    assert_eq!(m.components.len(), 2);
    assert_eq!(m.merge.strategy, Strategy::Ties);
    assert_eq!(m.merge.sign_method, SignMethod::Frequency);
    assert_eq!(m.merge.density, Some(0.2));
    assert_eq!(m.merge.semantics, Semantics::Peft);
    // Defaults: linear, total; the density may be omitted for linear.
    let AdapterSpec::Merged(m) = resolve(merged(two(None, None))).unwrap() else {
        panic!("merged")
    };
    assert_eq!(
        (m.merge.strategy, m.merge.sign_method),
        (Strategy::Linear, SignMethod::Total)
    );
    // A DARE merge without a seed gets the derived one, so repeats share a key.
    let dare = || resolve(merged(two(Some("dare_ties"), Some(0.5)))).unwrap();
    let (a, b) = (dare(), dare());
    assert_eq!(a.key(), b.key());
    let AdapterSpec::Merged(m) = a else {
        panic!("merged")
    };
    assert_eq!(
        m.merge.seed,
        derived_merge_seed(&m.components, &m.merge),
        "seed derived from the merge"
    );
    let seeded = resolve(merged(MergedAdapters {
        seed: Some(m.merge.seed ^ 1),
        ..two(Some("dare_ties"), Some(0.5))
    }))
    .unwrap();
    assert_ne!(seeded.key(), b.key());
    // The semantics flag reaches the spec and the key.
    let lorax = AdapterPolicy {
        merge_semantics: Semantics::Lorax,
        ..policy()
    };
    let l = resolve_adapter(&merged(two(None, None)), &lorax).unwrap();
    assert_ne!(l.key(), resolve(merged(two(None, None))).unwrap().key());
}
