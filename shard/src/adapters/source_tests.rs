//! Resolution of local and hub adapter ids (temp dirs and fake caches; no network).

use std::collections::HashMap;
use std::os::unix::fs::symlink;
use std::time::Duration;

use super::*;
use medley_hub::testing::{SHA, fake_cache};

fn fixture_adapter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/adapters/a_r4")
}

/// Copies the committed `a_r4` adapter into `dir`.
fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for name in ADAPTER_LAYOUT.required {
        std::fs::copy(fixture_adapter().join(name), dir.join(name)).expect("copy");
    }
}

fn hub(cache: Option<&Path>, offline: bool) -> HubSettings {
    let vars: HashMap<&str, String> = [("HF_ENDPOINT", "http://127.0.0.1:1".to_string())]
        .into_iter()
        .chain(cache.map(|c| ("HF_HUB_CACHE", c.display().to_string())))
        .chain(offline.then(|| ("HF_HUB_OFFLINE", "1".to_string())))
        .collect();
    let mut s = HubSettings::from_vars(None, |k| vars.get(k).cloned());
    s.request_timeout = Duration::from_secs(10);
    s
}

/// Two roots, `one/` (with adapter `x` and `nested/y`) and `two/` (with `z`).
struct Roots {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sources: AdapterSources,
}

fn roots() -> Roots {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().canonicalize().expect("canonical");
    write_adapter(&base.join("one/x"));
    write_adapter(&base.join("one/nested/y"));
    write_adapter(&base.join("two/z"));
    write_adapter(&base.join("outside/w"));
    let sources =
        AdapterSources::new(&[base.join("one"), base.join("two")], hub(None, true)).expect("roots");
    Roots {
        _tmp: tmp,
        base,
        sources,
    }
}

fn invalid(r: Result<ResolvedSource, AdapterError>) -> String {
    match r {
        Err(e @ AdapterError::Invalid(_)) => e.to_string(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn relative_and_absolute_ids_inside_the_roots() {
    let r = roots();
    let x = r.sources.resolve_local("x").expect("relative");
    assert_eq!(x.dir, r.base.join("one/x"));
    assert_eq!(
        r.sources.resolve_local("nested/y").expect("nested").dir,
        r.base.join("one/nested/y")
    );
    let abs = r.base.join("two/z");
    assert_eq!(
        r.sources
            .resolve_local(abs.to_str().expect("utf8"))
            .expect("absolute in root 2")
            .dir,
        abs
    );
    // A relative id only looks under the first root.
    assert!(matches!(
        r.sources.resolve_local("z"),
        Err(AdapterError::NotFound { .. })
    ));
}

#[test]
fn escapes_are_rejected() {
    let r = roots();
    let msg = invalid(r.sources.resolve_local("../outside/w"));
    assert!(msg.contains(".."), "{msg}");
    let msg = invalid(r.sources.resolve_local("nested/../../outside/w"));
    assert!(msg.contains(".."), "{msg}");
    let outside = r.base.join("outside/w");
    let msg = invalid(r.sources.resolve_local(outside.to_str().expect("utf8")));
    assert!(msg.contains("outside the adapter roots"), "{msg}");
    // A symlinked directory inside a root that leads out of every root.
    symlink(&outside, r.base.join("one/link")).expect("symlink");
    let msg = invalid(r.sources.resolve_local("link"));
    assert!(msg.contains("outside the adapter roots"), "{msg}");
    // A symlinked weight file that leads out.
    let dir = r.base.join("one/sneaky");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        fixture_adapter().join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .expect("copy");
    symlink(
        outside.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .expect("symlink");
    let msg = invalid(r.sources.resolve_local("sneaky"));
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    // Symlinks that stay inside the roots are fine.
    symlink(r.base.join("two/z"), r.base.join("one/to_z")).expect("symlink");
    assert_eq!(
        r.sources.resolve_local("to_z").expect("inside").dir,
        r.base.join("two/z")
    );
}

#[test]
fn missing_and_incomplete_directories_are_not_found() {
    let r = roots();
    let e = r.sources.resolve_local("nope").expect_err("missing");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.to_string().contains("nope"), "{e}");
    std::fs::create_dir_all(r.base.join("one/empty")).expect("mkdir");
    let e = r.sources.resolve_local("empty").expect_err("no files");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    std::fs::write(r.base.join("one/file"), b"x").expect("write");
    let e = r.sources.resolve_local("file").expect_err("a file");
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[test]
fn local_adapters_need_roots() {
    let sources = AdapterSources::new(&[], hub(None, true)).expect("no roots");
    let e = sources
        .resolve_local(fixture_adapter().to_str().expect("utf8"))
        .expect_err("refused");
    assert!(matches!(e, AdapterError::LocalDisabled { .. }));
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("--adapter-root"), "{e}");
    let tmp = tempfile::tempdir().expect("tmp");
    let bad = AdapterSources::new(&[tmp.path().join("missing")], hub(None, true));
    assert!(matches!(bad, Err(AdapterError::Invalid(_))));
}

#[test]
fn the_key_follows_file_changes() {
    let r = roots();
    let before = r.sources.resolve_local("x").expect("x").key;
    assert_eq!(r.sources.resolve_local("x").expect("x").key, before);
    let cfg = r.base.join("one/x/adapter_config.json");
    let mut text = std::fs::read_to_string(&cfg).expect("read");
    text.push('\n');
    std::fs::write(&cfg, text).expect("write");
    assert_ne!(r.sources.resolve_local("x").expect("x").key, before);
}

#[tokio::test]
async fn hub_ids_from_the_cache_or_not_found_offline() {
    let cache = tempfile::tempdir().expect("cache");
    let snapshot = fake_cache(cache.path(), "org/adapter", "main", write_adapter);
    let sources = AdapterSources::new(&[], hub(Some(cache.path()), true)).expect("sources");
    let got = sources
        .resolve_hub("org/adapter", None, None)
        .await
        .expect("cached");
    assert_eq!(got.dir, snapshot);
    let by_sha = sources
        .resolve_hub("org/adapter", Some(SHA), None)
        .await
        .expect("by sha");
    assert_eq!(by_sha.dir, snapshot);
    for (id, rev) in [("org/other", None), ("org/adapter", Some("v2"))] {
        let e = sources.resolve_hub(id, rev, None).await.expect_err("miss");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        assert!(e.to_string().contains("HF_HUB_OFFLINE=1"), "{e}");
        assert!(e.to_string().contains(id), "{e}");
    }
    let e = sources
        .resolve_hub("a/b/c", None, None)
        .await
        .expect_err("bad id");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Through an adapter reference.
    let r = medley_spec::AdapterRef {
        id: "org/adapter".into(),
        source: medley_spec::AdapterSource::Hub,
        revision: None,
        api_token: None,
    };
    assert_eq!(sources.resolve(&r).await.expect("ref").dir, snapshot);
}

#[tokio::test]
async fn hub_download_failures_name_the_endpoint() {
    let cache = tempfile::tempdir().expect("cache");
    let sources = AdapterSources::new(&[], hub(Some(cache.path()), false)).expect("sources");
    let e = sources
        .resolve_hub("org/adapter", None, Some("tok"))
        .await
        .expect_err("unreachable hub");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

/// A built-in id resolves to its directory offline, without a cache, at the default revision
/// only; other ids still go to the hub; an `ID=DIR` flag that is not one is refused.
#[tokio::test]
async fn builtin_ids_resolve_to_their_directories_offline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("sql");
    write_adapter(&dir);
    let flag = format!("medley-demo/sql={}", dir.display());
    let builtin: BuiltinAdapter = flag.parse().expect("ID=DIR");
    assert_eq!(builtin.id, "medley-demo/sql");
    let cache = tempfile::tempdir().expect("cache");
    let sources = AdapterSources::new(&[], hub(Some(cache.path()), true))
        .expect("sources")
        .with_builtin(vec![builtin]);
    for rev in [None, Some(""), Some("main")] {
        let got = sources
            .resolve_hub("medley-demo/sql", rev, None)
            .await
            .expect("built in");
        assert_eq!(got.dir, dir);
    }
    let e = sources
        .resolve_hub("medley-demo/sql", Some("v2"), None)
        .await
        .expect_err("other revision");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = sources
        .resolve_hub("medley-demo/ad", None, None)
        .await
        .expect_err("not built in");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    for bad in ["medley-demo/sql", "=dir", "id="] {
        assert!(bad.parse::<BuiltinAdapter>().is_err(), "{bad}");
    }
}
