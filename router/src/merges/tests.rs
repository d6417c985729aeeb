use std::path::PathBuf;

use medley_spec::{AdapterSource, Semantics};

use super::*;

fn policy() -> AdapterPolicy {
    AdapterPolicy {
        max_merge_adapters: 4,
        adapter_roots: vec![PathBuf::from("/adapters")],
        default_source: AdapterSource::Hub,
        merge_semantics: Semantics::Peft,
        served_model_id: "org/base".into(),
    }
}

fn def(name: &str, ids: &[&str], weights: &[f32]) -> MergeDefinition {
    MergeDefinition {
        name: name.into(),
        merged_adapters: MergedAdapters {
            ids: Some(ids.iter().map(|s| s.to_string()).collect()),
            weights: Some(weights.to_vec()),
            merge_strategy: Some("ties".into()),
            density: Some(0.5),
            ..Default::default()
        },
        adapter_source: None,
    }
}

fn inline_key(m: &MergedAdapters) -> String {
    let selector = AdapterSelector {
        merged_adapters: Some(m),
        ..Default::default()
    };
    medley_spec::resolve_selector(selector, &policy())
        .expect("valid")
        .key()
        .to_string()
}

#[test]
fn register_get_list_remove() {
    let merges = NamedMerges::default();
    let m = merges
        .register(
            def("sql-and-ads", &["org/a", "org/b"], &[1.0, 0.5]),
            &policy(),
        )
        .expect("register");
    assert_eq!(m.key, inline_key(&m.definition.merged_adapters));
    assert_eq!(merges.get("sql-and-ads"), Some(m.clone()));
    merges
        .register(def("b", &["org/a"], &[1.0]), &policy())
        .expect("second");
    let names: Vec<String> = merges
        .list()
        .into_iter()
        .map(|m| m.definition.name)
        .collect();
    assert_eq!(names, ["b", "sql-and-ads"]);
    assert!(matches!(
        merges.register(def("b", &["org/c"], &[1.0]), &policy()),
        Err(NamedMergeError::Exists(n)) if n == "b"
    ));
    assert_eq!(merges.remove("b").expect("remove").definition.name, "b");
    assert!(matches!(
        merges.remove("b"),
        Err(NamedMergeError::NotFound(_))
    ));
    assert!(merges.get("b").is_none());
}

#[test]
fn names_and_specs_are_checked_when_registered() {
    let merges = NamedMerges::default();
    for bad in [
        "",
        "has space",
        "org/base",
        "__base_model__",
        &"x".repeat(129),
    ] {
        assert!(
            matches!(
                merges.register(def(bad, &["org/a"], &[1.0]), &policy()),
                Err(NamedMergeError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    // One weight for two ids; a local adapter outside the roots; no ids.
    let cases = [
        def("m", &["org/a", "org/b"], &[1.0]),
        MergeDefinition {
            adapter_source: Some("local".into()),
            ..def("m", &["/elsewhere/a"], &[1.0])
        },
        def("m", &[], &[]),
    ];
    for case in cases {
        let err = merges
            .register(case.clone(), &policy())
            .expect_err("invalid");
        assert!(
            matches!(err, NamedMergeError::Spec { .. }),
            "{case:?}: {err}"
        );
    }
    assert!(merges.list().is_empty());
}

#[test]
fn a_name_expands_to_the_inline_selector() {
    let merges = NamedMerges::default();
    let mut d = def("m", &["a"], &[1.0]);
    d.adapter_source = Some("local".into());
    d.merged_adapters.ids = Some(vec!["/adapters/a".into()]);
    merges.register(d, &policy()).expect("register");
    let request = AdapterSelector {
        adapter_id: Some(" m "),
        adapter_source: Some("hub"),
        api_token: Some("tok"),
        merged_adapters: None,
    };
    let named = merges.lookup(&request).expect("found");
    let expanded = named.expand(&request);
    assert_eq!(expanded.adapter_id, None);
    // The merge's own source wins; the request's token is kept.
    assert_eq!(expanded.adapter_source, Some("local"));
    assert_eq!(expanded.api_token, Some("tok"));
    assert_eq!(
        expanded.merged_adapters,
        Some(&named.definition.merged_adapters)
    );
    // Not a name, or a request with its own merge: no expansion.
    let other = AdapterSelector {
        adapter_id: Some("org/a"),
        ..request
    };
    assert!(merges.lookup(&other).is_none());
    let both = AdapterSelector {
        merged_adapters: Some(&named.definition.merged_adapters),
        ..request
    };
    assert!(merges.lookup(&both).is_none());
}

#[test]
fn files_load_as_json_or_yaml() {
    let dir = tempfile::tempdir().expect("tmp");
    let json = dir.path().join("merges.json");
    std::fs::write(
        &json,
        r#"[{"name": "j", "merged_adapters": {"ids": ["org/a", "org/b"], "weights": [1, 1]}}]"#,
    )
    .expect("write");
    let loaded = load_file(&json, &policy()).expect("json");
    assert!(loaded.get("j").is_some());

    let yaml = dir.path().join("merges.yaml");
    std::fs::write(
        &yaml,
        "merges:\n  - name: y\n    merged_adapters:\n      ids: [org/a, org/b]\n      weights: [0.5, 0.5]\n      merge_strategy: dare_ties\n      density: 0.3\n",
    )
    .expect("write");
    let loaded = load_file(&yaml, &policy()).expect("yaml");
    let y = loaded.get("y").expect("y");
    assert_eq!(y.definition.merged_adapters.density, Some(0.3));

    std::fs::write(&yaml, "merges:\n  - name: y\n    typo: 1\n").expect("write");
    let err = load_file(&yaml, &policy()).expect_err("unknown field");
    assert!(err.to_string().contains("--merges"), "{err}");
    let err = load_file(&dir.path().join("missing.json"), &policy()).expect_err("missing");
    assert!(matches!(err, NamedMergeError::File { .. }));
    std::fs::write(
        &json,
        r#"[{"name": "dup", "merged_adapters": {"ids": ["org/a"], "weights": [1]}},
           {"name": "dup", "merged_adapters": {"ids": ["org/b"], "weights": [1]}}]"#,
    )
    .expect("write");
    assert!(matches!(
        load_file(&json, &policy()),
        Err(NamedMergeError::Exists(_))
    ));
}
