//! S3 adapters against a minimal S3 on loopback (ListObjectsV2, GET/HEAD with ETag and
//! `If-Match`, S3's XML errors, an access-key check): settings, cache keying, error mapping,
//! downloads, re-use and re-fetch on a new ETag, and an empty cache after every failure.

use std::collections::HashMap;

use super::*;

const GOOD_KEY: &str = "AKIDGOOD";
const SECRET: &str = "top-secret-value";

fn fixture(name: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/adapters/a_r4");
    std::fs::read(dir.join(name)).expect("fixture")
}

fn vars(pairs: &[(&str, &str)]) -> S3Settings {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    S3Settings::from_vars(|k| map.get(k).cloned())
}

fn settings(endpoint: &str, key: &str, cache: &Path) -> S3Settings {
    let mut s = vars(&[
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT_URL", endpoint),
        ("MEDLEY_S3_CACHE", cache.to_str().expect("utf8")),
    ]);
    s.max_retries = 0;
    s.request_timeout = Duration::from_secs(10);
    s
}

/// Every entry under `dir` (recursively), for "nothing was cached" checks.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(read) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in read.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(entries(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn settings_come_from_the_standard_variables() {
    let s = vars(&[
        ("AWS_ACCESS_KEY_ID", "AKID"),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", "session-secret"),
        ("AWS_DEFAULT_REGION", "eu-west-1"),
        ("AWS_ENDPOINT_URL", "http://generic"),
        ("AWS_ENDPOINT_URL_S3", "http://s3-specific"),
        ("XDG_CACHE_HOME", "/xdg"),
        ("HOME", "/home/u"),
    ]);
    assert_eq!(s.region, "eu-west-1");
    assert_eq!(s.endpoint.as_deref(), Some("http://s3-specific"));
    assert_eq!(s.cache_dir, Some(PathBuf::from("/xdg/medley/s3")));
    assert_eq!(s.credentials(), Ok(("AKID", SECRET)));
    let debug = format!("{s:?}");
    assert!(
        !debug.contains(SECRET) && !debug.contains("session-secret") && debug.contains("AKID"),
        "{debug}"
    );

    let s = vars(&[
        ("AWS_REGION", "us-west-2"),
        ("AWS_DEFAULT_REGION", "eu-west-1"),
        ("AWS_ENDPOINT_URL", "http://generic"),
        ("HOME", "/home/u"),
        ("XDG_CACHE_HOME", ""),
    ]);
    assert_eq!(s.region, "us-west-2");
    assert_eq!(s.endpoint.as_deref(), Some("http://generic"));
    assert_eq!(s.cache_dir, Some(PathBuf::from("/home/u/.cache/medley/s3")));
    let s = vars(&[("MEDLEY_S3_CACHE", "/c"), ("HOME", "/home/u")]);
    assert_eq!(s.cache_dir, Some(PathBuf::from("/c")));
    assert_eq!(s.region, "us-east-1");
    assert_eq!(s.endpoint, None);
    assert_eq!(vars(&[]).cache_dir, None);
}

#[test]
fn missing_credentials_say_what_to_set() {
    for (pairs, first) in [
        (&[][..], "no S3 credentials"),
        (
            &[("AWS_ACCESS_KEY_ID", "AKID")][..],
            "AWS_SECRET_ACCESS_KEY is not",
        ),
        (
            &[("AWS_SECRET_ACCESS_KEY", SECRET)][..],
            "AWS_ACCESS_KEY_ID is not",
        ),
    ] {
        let err = vars(pairs).credentials().expect_err("no credentials");
        assert!(err.contains(first), "{err}");
        assert!(
            err.contains("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") && !err.contains(SECRET),
            "{err}"
        );
    }
}

fn object(name: &str, etag: &str) -> RemoteObject {
    RemoteObject {
        name: name.into(),
        etag: Some(etag.into()),
        size: 10,
        last_modified: "2024-01-01T00:00:00+00:00".into(),
    }
}

#[test]
fn cache_dirs_are_keyed_by_bucket_prefix_and_etags() {
    let root = Path::new("/cache");
    let loc = S3Location::parse("s3://bucket/team/sql").expect("id");
    let objs = [object("a", "\"1\""), object("b", "\"2\"")];
    let dir = cache_dir(root, &loc, &objs);
    assert!(dir.starts_with("/cache/bucket"), "{}", dir.display());
    assert_eq!(dir.components().count(), 5, "{}", dir.display());
    assert_eq!(dir, cache_dir(root, &loc, &objs), "stable");
    // A new ETag is a new version of the same prefix (same parent).
    let changed = cache_dir(root, &loc, &[object("a", "\"1\""), object("b", "\"3\"")]);
    assert_ne!(changed, dir);
    assert_eq!(changed.parent(), dir.parent());
    // Another prefix or bucket is another adapter.
    let other = S3Location::parse("s3://bucket/team/sql2").expect("id");
    assert_ne!(cache_dir(root, &other, &objs).parent(), dir.parent());
    let other = S3Location::parse("s3://bucket2/team/sql").expect("id");
    assert!(cache_dir(root, &other, &objs).starts_with("/cache/bucket2"));
    // Without ETags, size and modification time identify the version.
    let mut no_etag = objs.clone();
    no_etag[1].etag = None;
    let a = cache_dir(root, &loc, &no_etag);
    no_etag[1].size = 11;
    assert_ne!(a, cache_dir(root, &loc, &no_etag));
}

fn failure(status: Option<u16>, code: Option<&str>, message: Option<&str>) -> S3Failure {
    S3Failure {
        status,
        code: code.map(str::to_string),
        message: message.map(str::to_string),
        text: "error text".into(),
    }
}

#[test]
fn s3_answers_map_to_adapter_errors() {
    let loc = S3Location::parse("s3://bucket/p").expect("id");
    let id = "s3://bucket/p";
    let e = failure(
        Some(404),
        Some("NoSuchBucket"),
        Some("The specified bucket does not exist"),
    )
    .into_error(id, &loc, None);
    assert!(
        matches!(&e, AdapterError::NotFound { detail, .. } if detail.contains("bucket bucket does not exist")),
        "{e}"
    );
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = failure(Some(404), None, None).into_error(id, &loc, Some("adapter_config.json"));
    assert!(
        matches!(&e, AdapterError::NotFound { detail, .. } if detail.contains("no object s3://bucket/p/adapter_config.json (HTTP 404)")),
        "{e}"
    );
    for (status, code, hint) in [
        (
            403,
            Some("InvalidAccessKeyId"),
            "AWS_ACCESS_KEY_ID is not known",
        ),
        (
            403,
            Some("SignatureDoesNotMatch"),
            "AWS_SECRET_ACCESS_KEY does not match",
        ),
        (403, Some("AccessDenied"), "may not read this bucket"),
        (400, Some("ExpiredToken"), "AWS_SESSION_TOKEN"),
        (401, None, "may not read"),
        (403, None, "may not read"),
    ] {
        let e = failure(Some(status), code, Some("refused")).into_error(id, &loc, None);
        assert!(
            matches!(&e, AdapterError::PermissionDenied { detail, .. } if detail.contains(hint)),
            "{status} {code:?}: {e}"
        );
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
    let e = failure(
        Some(301),
        Some("PermanentRedirect"),
        Some("use the right endpoint"),
    )
    .into_error(id, &loc, None);
    assert!(
        matches!(&e, AdapterError::S3 { detail, .. } if detail.contains("AWS_REGION")),
        "{e}"
    );
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = failure(None, None, None).into_error(id, &loc, None);
    assert!(
        matches!(&e, AdapterError::S3 { detail, .. } if detail.contains("error text")),
        "{e}"
    );
}

#[test]
fn status_and_codes_are_read_from_object_store_messages() {
    let text = "Generic S3 error: Error performing list request: Error after 0 retries in 1ms, max_retries:0, retry_timeout:60s, source:Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
    assert_eq!(status_in(text), Some(404));
    assert_eq!(xml_field(text, "Code").as_deref(), Some("NoSuchBucket"));
    assert_eq!(
        xml_field(text, "Message").as_deref(),
        Some("The specified bucket does not exist")
    );
    assert_eq!(status_in("connection refused"), None);
    assert_eq!(xml_field("<Code></Code>", "Code"), None);
}

#[path = "s3_fake.rs"]
mod fake_s3;

const CONFIG: &str = "team/sql/adapter_config.json";
const WEIGHTS: &str = "team/sql/adapter_model.safetensors";

async fn fake() -> (Arc<fake_s3::S3>, String) {
    let s3 = Arc::new(fake_s3::S3 {
        access_key: GOOD_KEY.into(),
        ..Default::default()
    });
    s3.put("adapters", CONFIG, fixture("adapter_config.json"));
    s3.put("adapters", WEIGHTS, fixture("adapter_model.safetensors"));
    s3.put(
        "adapters",
        "team/other/README.md",
        b"not an adapter".to_vec(),
    );
    s3.put("empty-bucket", "x/y", b"y".to_vec());
    let endpoint = fake_s3::serve(s3.clone()).await;
    (s3, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_once_and_again_only_for_a_new_etag() {
    let (s3, endpoint) = fake().await;
    let cache = tempfile::tempdir().expect("tmp");
    let root = cache.path().join("s3");
    let sources =
        super::super::AdapterSources::new(&[], medley_hub::HubSettings::from_vars(None, |_| None))
            .expect("sources")
            .with_s3(settings(&endpoint, GOOD_KEY, &root));
    let r = medley_spec::AdapterRef {
        id: "s3://adapters/team/sql".into(),
        source: medley_spec::AdapterSource::S3,
        revision: None,
        api_token: None,
    };
    let first = sources.resolve(&r).await.expect("download");
    assert!(first.dir.starts_with(root.join("adapters")), "{first:?}");
    assert_eq!(
        std::fs::read(first.dir.join("adapter_model.safetensors")).expect("weights"),
        fixture("adapter_model.safetensors")
    );
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(first.dir.join(SOURCE_FILE)).expect("source file"),
    )
    .expect("json");
    assert_eq!(meta["id"], "s3://adapters/team/sql");
    assert_eq!((s3.gets(CONFIG), s3.gets(WEIGHTS)), (1, 1));

    // The second load lists the prefix but downloads nothing.
    let second = sources.resolve(&r).await.expect("cached");
    assert_eq!(second, first);
    assert_eq!((s3.gets(CONFIG), s3.gets(WEIGHTS)), (1, 1));

    // A new object on the server (new ETag) is fetched again, into a new version directory.
    let mut config: serde_json::Value =
        serde_json::from_slice(&fixture("adapter_config.json")).expect("config");
    config["lora_alpha"] = serde_json::json!(3.0);
    s3.put(
        "adapters",
        CONFIG,
        serde_json::to_vec(&config).expect("json"),
    );
    let third = sources.resolve(&r).await.expect("changed");
    assert_ne!(third.dir, first.dir);
    assert_ne!(third.key, first.key);
    assert_eq!(third.dir.parent(), first.dir.parent());
    assert_eq!((s3.gets(CONFIG), s3.gets(WEIGHTS)), (2, 2));
    let cached: serde_json::Value = serde_json::from_slice(
        &std::fs::read(third.dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cached["lora_alpha"], 3.0);
    // No download directory is left behind.
    let partial: Vec<_> = entries(&root)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(PARTIAL_PREFIX))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");

    // A GetObject-only principal (listing denied) resolves through HEAD requests.
    *s3.deny_list.lock().expect("lock") = true;
    let fourth = sources.resolve(&r).await.expect("head fallback");
    assert_eq!(fourth.dir, third.dir);
    assert_eq!((s3.gets(CONFIG), s3.gets(WEIGHTS)), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_clear_and_cache_nothing() {
    let (s3, endpoint) = fake().await;
    let cache = tempfile::tempdir().expect("tmp");
    let root = cache.path().join("s3");
    let good = S3Adapters::new(settings(&endpoint, GOOD_KEY, &root));

    let not_found = |r: Result<PathBuf, AdapterError>, want: &str| match r {
        Err(e @ AdapterError::NotFound { .. }) => {
            assert!(e.to_string().contains(want), "{e}");
        }
        other => panic!("expected NotFound ({want}), got {other:?}"),
    };
    not_found(
        good.resolve("s3://no-such-bucket/team/sql").await,
        "bucket no-such-bucket does not exist",
    );
    not_found(
        good.resolve("s3://adapters/team/missing").await,
        "no object under s3://adapters/team/missing/",
    );
    not_found(
        good.resolve("s3://adapters/team/other").await,
        "has no adapter_config.json (it holds README.md)",
    );
    not_found(
        good.resolve("s3://adapters/team").await,
        "(it holds other/, sql/)",
    );
    assert!(entries(&root).is_empty(), "{:?}", entries(&root));

    // Credentials S3 refuses: PERMISSION_DENIED, nothing cached, no secret in the message.
    let bad = S3Adapters::new(settings(&endpoint, "AKIDBAD", &root));
    match bad.resolve("s3://adapters/team/sql").await {
        Err(e @ AdapterError::PermissionDenied { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("InvalidAccessKeyId")
                    && text.contains("AWS_ACCESS_KEY_ID")
                    && !text.contains(SECRET),
                "{text}"
            );
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    // No credentials at all: which variables to set.
    let mut none = settings(&endpoint, GOOD_KEY, &root);
    none.access_key_id = None;
    none.secret_access_key = None;
    match S3Adapters::new(none)
        .resolve("s3://adapters/team/sql")
        .await
    {
        Err(e @ AdapterError::S3 { .. }) => {
            assert!(e.to_string().contains("set AWS_ACCESS_KEY_ID"), "{e}");
            assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        }
        other => panic!("expected S3, got {other:?}"),
    }
    // A malformed id.
    assert!(matches!(
        good.resolve("adapters/team/sql").await,
        Err(AdapterError::Invalid(_))
    ));
    assert!(entries(&root).is_empty(), "{:?}", entries(&root));

    // A download that fails half-way (the config arrived, the weights did not) leaves only the
    // empty cache root.
    s3.broken.lock().expect("lock").push(WEIGHTS.into());
    match good.resolve("s3://adapters/team/sql").await {
        Err(e @ AdapterError::S3 { .. }) => assert!(e.to_string().contains("InternalError"), "{e}"),
        other => panic!("expected S3, got {other:?}"),
    }
    assert_eq!(s3.gets(CONFIG), 1, "the config was downloaded");
    assert!(entries(&root).is_empty(), "{:?}", entries(&root));
    // Once the server recovers, the adapter downloads whole.
    s3.broken.lock().expect("lock").clear();
    let dir = good
        .resolve("s3://adapters/team/sql")
        .await
        .expect("recovered");
    assert!(check_repo_dir(&dir, &ADAPTER_LAYOUT).is_ok());
}
