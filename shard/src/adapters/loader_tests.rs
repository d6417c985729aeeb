//! Loading plans, reading, shape checks, merging and the source cache (local temp dirs).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use medley_merge::Matrix;
use medley_merge::Strategy;
use medley_merge::fixture::{AdapterFixture, LlamaShape};
use medley_merge::peft::{TENSOR_PREFIX, TensorDtype, write_adapter_files};
use medley_proto::shard::v1 as pb;

use super::*;
use crate::adapters::base::tests::tiny_config;
use crate::model::TargetModule;
use medley_hub::HubSettings;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    loader: AdapterLoader,
}

/// A loader for the tiny model with one root holding rank-4 adapters `a` and `b`, rank-2 `c`.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let shapes = LlamaShape::tiny().module_shapes();
    for (name, rank, seed) in [("a", 4, 1), ("b", 4, 2), ("c", 2, 3)] {
        AdapterFixture::new(rank, seed)
            .write(&root.join(name), &shapes)
            .expect("write");
    }
    let mut settings = AdapterSettings::new(HubSettings::from_vars(None, |_| None));
    settings.roots = vec![root.clone()];
    settings.merge_threads = 1;
    let loader = AdapterLoader::new(
        &settings,
        BaseModules::from_config(&tiny_config()),
        &Device::Cpu,
    )
    .expect("loader");
    Fixture {
        _tmp: tmp,
        root,
        loader,
    }
}

fn local(id: &str) -> pb::AdapterRef {
    pb::AdapterRef {
        id: id.into(),
        source: pb::AdapterSource::Local as i32,
        revision: None,
        api_token: None,
    }
}

/// The decoded form of [`local`].
fn local_ref(id: &str) -> AdapterRef {
    AdapterRef {
        id: id.into(),
        source: medley_spec::AdapterSource::Local,
        revision: None,
        api_token: None,
    }
}

/// A plan from a wire spec, as the shard's server decodes it.
fn plan(spec: Option<pb::AdapterSpec>) -> Result<LoadPlan, AdapterError> {
    LoadPlan::from_spec(medley_spec::wire::spec_from_proto(spec)?)
}

fn merged(ids: &[&str], weights: &[f32], strategy: &str) -> pb::AdapterSpec {
    pb::AdapterSpec {
        kind: Some(pb::adapter_spec::Kind::Merged(pb::MergeParameters {
            components: ids
                .iter()
                .zip(weights)
                .map(|(id, w)| pb::MergeComponent {
                    adapter: Some(local(id)),
                    weight: *w,
                })
                .collect(),
            strategy: strategy.into(),
            density: Some(0.5),
            majority_sign_method: "total".into(),
            seed: 3,
            svd_rank: None,
            semantics: "peft".into(),
            svd_clamp: None,
        })),
    }
}

fn invalid_message(r: Result<PreparedAdapter, AdapterError>) -> String {
    match r {
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
            e.to_string()
        }
        Ok(p) => panic!("expected an error, got {:?}", p.adapter),
    }
}

#[test]
fn plans_from_proto() {
    let p = plan(Some(merged(&["a", "b"], &[1.0, -0.5], "TIES"))).expect("ok");
    let spec = p.merge.expect("merge");
    assert_eq!(spec.strategy, Strategy::Ties);
    assert_eq!(spec.weights, vec![1.0, -0.5]);
    assert_eq!((spec.density, spec.seed), (Some(0.5), 3));
    assert_eq!(p.components, vec![local_ref("a"), local_ref("b")]);
    let single = pb::AdapterSpec {
        kind: Some(pb::adapter_spec::Kind::Single(local("a"))),
    };
    assert_eq!(
        plan(Some(single)).expect("single"),
        LoadPlan {
            components: vec![local_ref("a")],
            merge: None
        }
    );
    for (spec, needle) in [
        (None, "the adapter spec is empty"),
        (Some(merged(&[], &[], "linear")), "at least one"),
        (Some(merged(&["a"], &[1.0], "average")), "valid values"),
    ] {
        let e = plan(spec).expect_err(needle);
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains(needle), "{e}");
    }
    let mut m = merged(&["a"], &[1.0], "linear");
    if let Some(pb::adapter_spec::Kind::Merged(p)) = &mut m.kind {
        p.components[0].adapter = None;
        p.semantics = "lorax".into();
    }
    assert!(plan(Some(m)).is_err());
    assert!(LoadPlan::from_spec(AdapterSpec::Base).is_err());
}

#[test]
fn single_adapter_keeps_its_scales() {
    let f = fixture();
    let src = f.loader.sources().resolve_local("a").expect("a");
    let p = f.loader.build(&[src], None).expect("single");
    assert_eq!(p.merge_ns, 0);
    assert_eq!(p.adapter.rank(), 4);
    // alpha = 2r: B scaled by 2.
    let read = medley_merge::peft::read_adapter_dir(&f.root.join("a")).expect("read");
    let b = read.adapter.modules()["model.layers.0.self_attn.k_proj"].b();
    let got = p
        .adapter
        .module(0, TargetModule::K)
        .expect("k")
        .b_t
        .t()
        .and_then(|t| t.to_vec2::<f32>())
        .expect("b");
    assert_eq!(got[3][1], 2.0 * b.data()[3 * 4 + 1]);
}

#[test]
fn merges_run_on_the_pool_and_reuse_parsed_sources() {
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let f = fixture();
    let loader = f.loader.with_before_merge(std::sync::Arc::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    let srcs = |ids: &[&str]| -> Vec<ResolvedSource> {
        ids.iter()
            .map(|id| loader.sources().resolve_local(id).expect("resolve"))
            .collect()
    };
    let ties = plan(Some(merged(&["a", "b"], &[1.0, 0.6], "ties"))).expect("plan");
    let spec = ties.merge.expect("merge");
    let first = loader
        .build(&srcs(&["a", "b"]), Some(&spec))
        .expect("merge");
    assert_eq!(loader.cache_stats().0, 2);
    let again = loader
        .build(&srcs(&["a", "b"]), Some(&spec))
        .expect("merge");
    assert_eq!(first.adapter.content_hash(), again.adapter.content_hash());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Same components in another order: a different merge.
    let swapped = loader
        .build(&srcs(&["b", "a"]), Some(&spec))
        .expect("merge");
    assert_ne!(swapped.adapter.content_hash(), first.adapter.content_hash());
    assert_eq!(loader.cache_stats().0, 2, "still two parsed sources");
    // cat of mixed ranks: rank 4 + 2.
    let cat = plan(Some(merged(&["a", "c"], &[1.0, 0.5], "cat"))).expect("plan");
    let p = loader
        .build(&srcs(&["a", "c"]), cat.merge.as_ref())
        .expect("cat");
    assert_eq!(p.adapter.rank(), 6);
}

#[test]
fn mixed_ranks_with_an_equal_rank_strategy_suggest_cat() {
    let f = fixture();
    let srcs: Vec<_> = ["a", "c"]
        .iter()
        .map(|id| f.loader.sources().resolve_local(id).expect("resolve"))
        .collect();
    let ties = plan(Some(merged(&["a", "c"], &[1.0, 0.5], "ties"))).expect("plan");
    let msg = invalid_message(f.loader.build(&srcs, ties.merge.as_ref()));
    assert!(msg.contains("`cat`") && msg.contains("[a, c]"), "{msg}");
}

/// Writes an adapter whose only module is `path` with factors of the given shapes.
fn write_raw(dir: &Path, path: &str, a: (usize, usize), b: (usize, usize)) {
    let config = AdapterFixture::new(a.0, 0).config_json();
    let tensors = vec![
        (
            format!("{TENSOR_PREFIX}{path}.lora_A.weight"),
            Matrix::zeros(a.0, a.1),
        ),
        (
            format!("{TENSOR_PREFIX}{path}.lora_B.weight"),
            Matrix::new(b.0, b.1, vec![0.5; b.0 * b.1]).expect("b"),
        ),
    ];
    write_adapter_files(dir, &config, &tensors, TensorDtype::F32).expect("write");
}

#[test]
fn adapters_for_another_model_are_refused_clearly() {
    let f = fixture();
    let other = LlamaShape {
        hidden: 32,
        intermediate: 88,
        ..LlamaShape::tiny()
    };
    AdapterFixture::new(4, 9)
        .write(&f.root.join("foreign"), &other.module_shapes())
        .expect("write");
    let src = f
        .loader
        .sources()
        .resolve_local("foreign")
        .expect("resolve");
    let msg = invalid_message(f.loader.build(&[src], None));
    // The first module in path order, with both shapes.
    assert!(
        msg.contains("model.layers.0.mlp.down_proj")
            && msg.contains("(out 32, in 88)")
            && msg.contains("(out 64, in 176)"),
        "{msg}"
    );
    for (name, path, needle) in [
        ("head", "lm_head", "not supported"),
        ("deep", "model.layers.7.self_attn.q_proj", "2 layers"),
    ] {
        write_raw(&f.root.join(name), path, (2, 64), (64, 2));
        let src = f.loader.sources().resolve_local(name).expect("resolve");
        let msg = invalid_message(f.loader.build(&[src], None));
        assert!(msg.contains(path) && msg.contains(needle), "{msg}");
    }
    // An unsupported PEFT feature.
    let dir = f.root.join("dora");
    AdapterFixture::new(2, 1)
        .write(&dir, &LlamaShape::tiny().module_shapes())
        .expect("write");
    let cfg = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg)
            .expect("read")
            .replacen('{', "{\"use_dora\": true,", 1);
    std::fs::write(&cfg, text).expect("write");
    let src = f.loader.sources().resolve_local("dora").expect("resolve");
    let msg = invalid_message(f.loader.build(&[src], None));
    assert!(msg.contains("use_dora"), "{msg}");
}

#[tokio::test]
async fn prepare_resolves_then_builds() {
    let f = fixture();
    let loader = std::sync::Arc::new(f.loader);
    let linear = plan(Some(merged(&["a", "b"], &[1.0, 0.6], "linear"))).expect("plan");
    let p = loader.prepare(linear).await.expect("prepared");
    assert!(p.merge_ns > 0);
    assert_eq!(p.adapter.rank(), 4);
    let missing = plan(Some(merged(&["a", "zz"], &[1.0, 0.6], "linear"))).expect("plan");
    let e = loader.prepare(missing).await.expect_err("missing");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.to_string().contains("zz"), "{e}");
}
