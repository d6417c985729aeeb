//! Hub settings, cache layout and download tests (the download ones against local fake
//! servers: no network).

use std::collections::HashMap;

use super::model_dir::testing::{copy_fixture, write_sharded};
use super::testing::{SHA, fake_cache, fake_hub};
use super::*;

fn settings(vars: &[(&str, &str)], cache: Option<&str>) -> HubSettings {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    HubSettings::from_vars(cache.map(PathBuf::from), |k| map.get(k).cloned())
}

#[test]
fn cache_dir_precedence() {
    let all = [("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b"), ("HOME", "/c")];
    assert_eq!(
        settings(&all, Some("/flag")).cache_dir,
        Some("/flag".into())
    );
    assert_eq!(settings(&all, None).cache_dir, Some("/a".into()));
    assert_eq!(settings(&all[1..], None).cache_dir, Some("/b/hub".into()));
    assert_eq!(
        settings(&all[2..], None).cache_dir,
        Some("/c/.cache/huggingface/hub".into())
    );
    assert_eq!(settings(&[], None).cache_dir, None);
}

#[test]
fn offline_endpoint_and_token() {
    let s = settings(&[], None);
    assert!(!s.offline);
    assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
    assert_eq!(s.token, None);
    for on in ["1", "true", "YES", "on"] {
        assert!(settings(&[("HF_HUB_OFFLINE", on)], None).offline, "{on}");
    }
    assert!(!settings(&[("HF_HUB_OFFLINE", "0")], None).offline);
    let s = settings(
        &[
            ("HF_ENDPOINT", "http://mirror:8000/"),
            ("HUGGING_FACE_HUB_TOKEN", "old"),
        ],
        None,
    );
    assert_eq!(s.endpoint, "http://mirror:8000");
    assert_eq!(s.token.as_deref(), Some("old"));
    let s = settings(
        &[("HF_TOKEN", "new"), ("HUGGING_FACE_HUB_TOKEN", "old")],
        None,
    );
    assert_eq!(s.token.as_deref(), Some("new"));
    let shown = format!("{s:?}");
    assert!(
        !shown.contains("new") && shown.contains("<redacted>"),
        "{shown}"
    );
}

#[test]
fn repo_ids() {
    for ok in [
        "org/name",
        "gpt2",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "a_b/c.d",
    ] {
        assert!(is_valid_repo_id(ok), "{ok}");
    }
    for bad in [
        "", "a/b/c", "org/", "/name", "a--b/c", "a/b..c", "-a/b", "a/b.", "a b/c",
    ] {
        assert!(!is_valid_repo_id(bad), "{bad}");
    }
}

#[test]
fn cache_hit_by_ref_and_by_sha() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snapshot = fake_cache(tmp.path(), "org/name", "main", copy_fixture);
    match lookup_cache(tmp.path(), "org/name", "main") {
        CacheLookup::Hit(files) => assert_eq!(files.dir, snapshot),
        other => panic!("expected a hit, got {other:?}"),
    }
    match lookup_cache(tmp.path(), "org/name", SHA) {
        CacheLookup::Hit(files) => assert_eq!(files.dir, snapshot),
        other => panic!("expected a hit by sha, got {other:?}"),
    }
    assert!(matches!(
        lookup_cache(tmp.path(), "org/name", "v2"),
        CacheLookup::Miss
    ));
    assert!(matches!(
        lookup_cache(tmp.path(), "org/other", "main"),
        CacheLookup::Miss
    ));
}

#[test]
fn cache_ref_with_slashes() {
    let tmp = tempfile::tempdir().expect("tmp");
    fake_cache(tmp.path(), "org/name", "refs/pr/1", copy_fixture);
    assert!(matches!(
        lookup_cache(tmp.path(), "org/name", "refs/pr/1"),
        CacheLookup::Hit(_)
    ));
}

#[test]
fn cache_with_missing_shard_is_incomplete() {
    let tmp = tempfile::tempdir().expect("tmp");
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    fake_cache(tmp.path(), "org/name", "main", |dir| {
        write_sharded(dir, &shards, &shards[..1])
    });
    match lookup_cache(tmp.path(), "org/name", "main") {
        CacheLookup::Incomplete(err) => {
            assert!(err.to_string().contains(shards[1]), "{err}")
        }
        other => panic!("expected incomplete, got {other:?}"),
    }
}

/// An endpoint nobody listens on fails fast with an error naming it (no hang).
#[tokio::test]
async fn unreachable_endpoint_fails_fast() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut s = settings(&[("HF_ENDPOINT", "http://127.0.0.1:1")], None);
    s.request_timeout = Duration::from_secs(20);
    let started = std::time::Instant::now();
    let err = download(&s, tmp.path(), "org/name", "main")
        .await
        .expect_err("nothing listens on port 1");
    let msg = err.to_string();
    assert!(msg.contains("http://127.0.0.1:1"), "{msg}");
    assert!(msg.contains("org/name"), "{msg}");
    assert!(matches!(err, DownloadError::Api { .. }), "{err:?}");
    // A refused connection is immediate; the bound only guards against a hang.
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// An endpoint that accepts connections but never answers hits the request timeout.
#[tokio::test]
async fn silent_endpoint_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let tmp = tempfile::tempdir().expect("tmp");
    let endpoint = format!("http://{addr}");
    let mut s = settings(&[("HF_ENDPOINT", &endpoint)], None);
    s.request_timeout = Duration::from_millis(300);
    let err = download(&s, tmp.path(), "org/name", "main")
        .await
        .expect_err("silent server");
    assert!(matches!(err, DownloadError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    hold.abort();
}

/// The whole download path against the fake hub: sharded weights, optional files only when the
/// repo has them, nothing else fetched, the token sent, and the result reusable offline.
#[tokio::test]
async fn download_sharded_repo_from_fake_hub() {
    use std::sync::Arc;

    let staging = tempfile::tempdir().expect("tmp");
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_sharded(staging.path(), &shards, &shards);
    std::fs::remove_file(staging.path().join("generation_config.json")).expect("rm");
    let mut hub = fake_hub::Hub::default();
    for entry in std::fs::read_dir(staging.path()).expect("ls") {
        let entry = entry.expect("entry");
        let name = entry.file_name().into_string().expect("utf8");
        hub.files
            .insert(name, std::fs::read(entry.path()).expect("read"));
    }
    hub.files.insert("README.md".into(), b"not needed".to_vec());
    let hub = Arc::new(hub);
    let endpoint = fake_hub::serve(hub.clone()).await;

    let cache = tempfile::tempdir().expect("cache");
    let mut s = settings(&[("HF_ENDPOINT", &endpoint), ("HF_TOKEN", "tok")], None);
    s.request_timeout = Duration::from_secs(10);
    let files = download(&s, cache.path(), "org/name", "main")
        .await
        .expect("download");
    let snapshot = cache.path().join("models--org--name/snapshots").join(SHA);
    assert_eq!(files.dir, snapshot);
    for (name, bytes) in &hub.files {
        let path = snapshot.join(name);
        if name == "README.md" {
            assert!(!path.exists(), "README.md was downloaded");
        } else {
            assert_eq!(&std::fs::read(&path).expect("downloaded"), bytes, "{name}");
        }
    }
    let mut fetched = hub.fetched.lock().expect("lock").clone();
    fetched.sort();
    fetched.dedup();
    let mut expected: Vec<String> = hub
        .files
        .keys()
        .filter(|n| *n != "README.md")
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(fetched, expected);
    assert_eq!(
        hub.auth.lock().expect("lock").as_deref(),
        Some("Bearer tok")
    );
    assert_eq!(
        std::fs::read_to_string(cache.path().join("models--org--name/refs/main"))
            .expect("ref")
            .trim(),
        SHA
    );
    // Offline, the cache now answers.
    assert!(matches!(
        lookup_cache(cache.path(), "org/name", "main"),
        CacheLookup::Hit(_)
    ));
}

#[tokio::test]
async fn repo_without_weights_is_a_clear_error() {
    use std::sync::Arc;

    let mut hub = fake_hub::Hub::default();
    hub.files.insert("config.json".into(), b"{}".to_vec());
    hub.files.insert("tokenizer.json".into(), b"{}".to_vec());
    let endpoint = fake_hub::serve(Arc::new(hub)).await;
    let cache = tempfile::tempdir().expect("cache");
    let s = settings(&[("HF_ENDPOINT", &endpoint)], None);
    let err = download(&s, cache.path(), "org/name", "main")
        .await
        .expect_err("no weights");
    assert!(
        matches!(err, DownloadError::MissingInRepo { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// The adapter layout: only the required files are fetched (no weights rule, no optional files),
/// and the result is found offline through `lookup_repo`.
#[tokio::test]
async fn download_repo_with_another_layout() {
    use std::sync::Arc;

    use model_dir::RepoLayout;

    const LAYOUT: RepoLayout = RepoLayout {
        kind: "adapter",
        required: &["adapter_config.json", "adapter_model.safetensors"],
        optional: &["README.md"],
        weights: None,
    };
    let mut hub = fake_hub::Hub::default();
    for (name, body) in [
        ("adapter_config.json", &b"{}"[..]),
        ("adapter_model.safetensors", b"weights"),
        ("model.safetensors", b"not wanted"),
    ] {
        hub.files.insert(name.into(), body.to_vec());
    }
    let hub = Arc::new(hub);
    let endpoint = fake_hub::serve(hub.clone()).await;
    let cache = tempfile::tempdir().expect("cache");
    let s = settings(&[("HF_ENDPOINT", &endpoint)], None);
    let files = download_repo(&s, cache.path(), "org/adapter", "main", &LAYOUT)
        .await
        .expect("download");
    assert_eq!(files.weights, None);
    assert!(files.dir.join("adapter_model.safetensors").is_file());
    assert!(!files.dir.join("model.safetensors").exists());
    let mut fetched = hub.fetched.lock().expect("lock").clone();
    fetched.sort();
    fetched.dedup();
    assert_eq!(
        fetched,
        vec!["adapter_config.json", "adapter_model.safetensors"]
    );
    assert!(matches!(
        lookup_repo(cache.path(), "org/adapter", "main", &LAYOUT),
        CacheLookup::Hit(_)
    ));
    // The model view of the same snapshot is incomplete.
    assert!(matches!(
        lookup_cache(cache.path(), "org/adapter", "main"),
        CacheLookup::Incomplete(_)
    ));
    // A repository without the required files counts as not found.
    let err = download_repo(
        &s,
        cache.path(),
        "org/adapter",
        "main",
        &model_dir::MODEL_LAYOUT,
    )
    .await
    .expect_err("not a model");
    assert!(err.is_not_found(), "{err:?}");
}

/// An unknown repository (404 on the listing) is reported as not found, with the status.
#[tokio::test]
async fn unknown_repo_is_not_found() {
    use std::sync::Arc;

    let hub = fake_hub::Hub {
        unknown: true,
        ..Default::default()
    };
    let endpoint = fake_hub::serve(Arc::new(hub)).await;
    let cache = tempfile::tempdir().expect("cache");
    // A token (a request's `api_token` reaches the hub this way) is never in an error.
    let token = "hf_secret_probe_token";
    let s = settings(&[("HF_ENDPOINT", &endpoint), ("HF_TOKEN", token)], None);
    let err = download(&s, cache.path(), "org/nothing", "main")
        .await
        .expect_err("unknown");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(token), "{shown}");
    assert!(
        matches!(
            err,
            DownloadError::Api {
                status: Some(404),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_not_found());
    // A refused connection is not "not found".
    let s = settings(
        &[("HF_ENDPOINT", "http://127.0.0.1:1"), ("HF_TOKEN", token)],
        None,
    );
    let err = download(&s, cache.path(), "org/nothing", "main")
        .await
        .expect_err("unreachable");
    assert!(!err.is_not_found(), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(token), "{shown}");
}
