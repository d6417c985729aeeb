//! GGUF files from hub repositories, against the fake hub of `medley_hub::testing` on
//! loopback (no network): one file downloaded and served, the cache reused without a request,
//! tags, clear errors, offline mode, revisions, split files.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::GgmlDType;

use super::*;
use crate::hub::testing::{SHA, fake_hub};
use crate::model_dir::Weights;
use crate::model_dir::testing::fixture_dir;

const REPO: &str = "org/tiny-GGUF";
const Q8: &str = "tiny.Q8_0.gguf";
const F32: &str = "tiny.F32.gguf";

/// A GGUF file of the fixture checkpoint with 2-D weights as `dtype`.
fn gguf_bytes(dtype: GgmlDType) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    medley_shard::fixture::write_gguf(&fixture_dir(), &path, dtype).unwrap();
    std::fs::read(path).unwrap()
}

/// A hub holding two real quantizations of the fixture plus files nobody needs.
fn gguf_hub() -> fake_hub::Hub {
    fake_hub::Hub::with_files([
        (".gitattributes", b"*.gguf filter=lfs".to_vec()),
        ("README.md", b"# tiny".to_vec()),
        (Q8, gguf_bytes(GgmlDType::Q8_0)),
        (F32, gguf_bytes(GgmlDType::F32)),
    ])
}

async fn serve(hub: fake_hub::Hub) -> (Arc<fake_hub::Hub>, String) {
    let hub = Arc::new(hub);
    let endpoint = fake_hub::serve(hub.clone()).await;
    (hub, endpoint)
}

fn request(model: &str, gguf_file: Option<&str>, endpoint: &str, cache: &Path) -> ResolveRequest {
    ResolveRequest {
        model: Some(model.to_string()),
        revision: None,
        gguf_file: gguf_file.map(str::to_string),
        hub: HubSettings {
            cache_dir: Some(cache.join("hub")),
            offline: false,
            endpoint: endpoint.to_string(),
            token: None,
            request_timeout: Duration::from_secs(10),
        },
        embedded_bases: vec![cache.join("embedded")],
        gguf_bases: vec![cache.join("gguf")],
    }
}

fn offline(mut request: ResolveRequest) -> ResolveRequest {
    request.hub.offline = true;
    request
}

/// The snapshot path of `name` in the cache under `tmp`.
fn snapshot_file(tmp: &Path, repo: &str, name: &str) -> PathBuf {
    tmp.join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(SHA)
        .join(name)
}

/// The view serves exactly the file `name` of the cache.
fn assert_serves(model: &ResolvedModel, tmp: &Path, name: &str) {
    let link = model.files.dir.join(GGUF_FILE);
    assert_eq!(model.files.weights, Weights::Gguf(link.clone()));
    assert!(model.files.dir.starts_with(tmp.join("gguf")), "{model:?}");
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        std::fs::canonicalize(snapshot_file(tmp, REPO, name)).unwrap(),
        "{name}"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&model.files.config).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 2);
}

#[tokio::test]
async fn gguf_file_downloads_that_file_alone_then_uses_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(gguf_hub()).await;
    let req = request(REPO, Some(Q8), &endpoint, tmp.path());
    let model = resolve_model(&req).await.unwrap();
    assert_eq!(model.source, ModelSource::HubDownload);
    assert_eq!(model.model_id, format!("{REPO}:{Q8}"));
    assert_serves(&model, tmp.path(), Q8);
    assert_eq!(
        std::fs::read(snapshot_file(tmp.path(), REPO, Q8)).unwrap(),
        hub.files[Q8]
    );
    // Only that file came down: no README, no other quantization.
    assert_eq!(hub.fetched_files(), vec![Q8]);
    assert!(!snapshot_file(tmp.path(), REPO, F32).exists());
    assert!(!snapshot_file(tmp.path(), REPO, "README.md").exists());
    // Again: the cache answers, without a single request, and the view is reused.
    let requests = hub.request_count();
    let again = resolve_model(&req).await.unwrap();
    assert_eq!(again.source, ModelSource::HubCache);
    assert_eq!(again.files.dir, model.files.dir);
    assert_eq!(hub.request_count(), requests);
    // And offline too.
    let cached = resolve_model(&offline(req)).await.unwrap();
    assert_eq!(cached.files.dir, model.files.dir);
    assert_eq!(hub.request_count(), requests);
}

#[tokio::test]
async fn tags_pick_the_matching_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(gguf_hub()).await;
    let f32_model = format!("{REPO}:f32");
    let model = resolve_model(&request(&f32_model, None, &endpoint, tmp.path()))
        .await
        .unwrap();
    assert_eq!(model.source, ModelSource::HubDownload);
    assert_eq!(model.model_id, f32_model);
    assert_serves(&model, tmp.path(), F32);
    assert_eq!(hub.fetched_files(), vec![F32]);
    // Another tag of the same repository: the other file, now both cached.
    let q8_model = format!("{REPO}:Q8_0");
    let q8 = resolve_model(&request(&q8_model, None, &endpoint, tmp.path()))
        .await
        .unwrap();
    assert_serves(&q8, tmp.path(), Q8);
    assert_ne!(q8.files.dir, model.files.dir);
    // Both tags now resolve from the cache without a request.
    let requests = hub.request_count();
    for (tag, name) in [(&f32_model, F32), (&q8_model, Q8)] {
        let again = resolve_model(&request(tag, None, &endpoint, tmp.path()))
            .await
            .unwrap();
        assert_eq!(again.source, ModelSource::HubCache);
        assert_serves(&again, tmp.path(), name);
    }
    assert_eq!(hub.request_count(), requests);
    // `Q8` is only part of the token `Q8_0`: online, the hub is asked whether other files
    // match; the answer is still the cached file, not downloaded again.
    let loose = resolve_model(&request(&format!("{REPO}:q8"), None, &endpoint, tmp.path()))
        .await
        .unwrap();
    assert_eq!(loose.source, ModelSource::HubCache);
    assert_serves(&loose, tmp.path(), Q8);
    assert_eq!(hub.request_count(), requests + 1);
    assert_eq!(hub.fetched_files(), vec![F32, Q8]);
}

/// A hub of quantization names (contents never fetched).
fn named_hub(names: &[&str]) -> fake_hub::Hub {
    fake_hub::Hub::with_files(names.iter().map(|n| (*n, b"GGUF".to_vec())))
}

#[tokio::test]
async fn ambiguous_missing_and_unselected_files_name_the_candidates() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["README.md", "m.Q4_K_M.gguf", "m.Q4_K_S.gguf", "m.Q8_0.gguf"];
    let (hub, endpoint) = serve(named_hub(&names)).await;
    let resolve = |model: String| {
        let req = request(&model, None, &endpoint, tmp.path());
        async move { resolve_model(&req).await.unwrap_err() }
    };
    let err = resolve(format!("{REPO}:Q4_K")).await;
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::GgufChoice { .. }), "{err:?}");
    assert!(err.is_argument_error());
    assert!(
        msg.contains("m.Q4_K_M.gguf, m.Q4_K_S.gguf") && msg.contains("several"),
        "{msg}"
    );
    let err = resolve(format!("{REPO}:Q5_K_M")).await;
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::GgufChoice { .. }), "{err:?}");
    for name in &names[1..] {
        assert!(msg.contains(name), "{msg}");
    }
    assert!(msg.contains("Q5_K_M") && !msg.contains("README"), "{msg}");
    // Neither --gguf-file nor a tag, and no config.json: the choices and how to make one.
    let err = resolve(REPO.to_string()).await;
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::GgufChoice { .. }), "{err:?}");
    assert!(
        msg.contains("m.Q4_K_M.gguf, m.Q4_K_S.gguf, m.Q8_0.gguf")
            && msg.contains("--gguf-file")
            && msg.contains(&format!("--model {REPO}:TAG")),
        "{msg}"
    );
    // A file the repository does not hold.
    let req = request(REPO, Some("m.Q5_0.gguf"), &endpoint, tmp.path());
    let msg = resolve_model(&req).await.unwrap_err().to_string();
    assert!(
        msg.contains("m.Q5_0.gguf") && msg.contains("m.Q8_0.gguf"),
        "{msg}"
    );
    // Nothing was downloaded for any of them.
    assert!(hub.fetched_files().is_empty());
}

#[tokio::test]
async fn the_only_gguf_file_of_a_repo_is_served_and_found_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(fake_hub::Hub::with_files([
        ("README.md", b"# one quantization".to_vec()),
        (Q8, gguf_bytes(GgmlDType::Q8_0)),
    ]))
    .await;
    let req = request(REPO, None, &endpoint, tmp.path());
    let model = resolve_model(&req).await.unwrap();
    assert_eq!(model.source, ModelSource::HubDownload);
    assert_eq!(model.model_id, REPO);
    assert_serves(&model, tmp.path(), Q8);
    assert_eq!(hub.fetched_files(), vec![Q8]);
    let requests = hub.request_count();
    let cached = resolve_model(&offline(req)).await.unwrap();
    assert_eq!(cached.source, ModelSource::HubCache);
    assert_eq!(cached.files.dir, model.files.dir);
    assert_eq!(hub.request_count(), requests);
}

#[tokio::test]
async fn offline_without_the_file_in_the_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(gguf_hub()).await;
    let err = resolve_model(&offline(request(REPO, Some(Q8), &endpoint, tmp.path())))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::Offline { .. }), "{err:?}");
    assert!(
        msg.contains("HF_HUB_OFFLINE=1") && msg.contains("no snapshot"),
        "{msg}"
    );
    // With the other quantization cached, the error says which file is missing and what is
    // there.
    resolve_model(&request(REPO, Some(F32), &endpoint, tmp.path()))
        .await
        .unwrap();
    let requests = hub.request_count();
    let msg = resolve_model(&offline(request(REPO, Some(Q8), &endpoint, tmp.path())))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("{Q8} is not cached"))
            && msg.contains(F32)
            && msg.contains("HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    let msg = resolve_model(&offline(request(
        &format!("{REPO}:Q8_0"),
        None,
        &endpoint,
        tmp.path(),
    )))
    .await
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("no cached .gguf file matches the tag `Q8_0`") && msg.contains(F32),
        "{msg}"
    );
    assert_eq!(
        hub.request_count(),
        requests,
        "offline must not ask the hub"
    );
}

#[tokio::test]
async fn gguf_file_with_a_local_model_or_a_non_gguf_repo_is_an_argument_error() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    let local = fixture.to_str().unwrap();
    let unused = "http://127.0.0.1:1";
    for (model, file) in [(local, Q8), ("./models/x", Q8)] {
        let err = resolve_model(&request(model, Some(file), unused, tmp.path()))
            .await
            .unwrap_err();
        assert!(matches!(err, ResolveError::Argument(_)), "{err:?}");
        assert!(err.to_string().contains("local path"), "{err}");
    }
    let mut no_model = request(REPO, Some(Q8), unused, tmp.path());
    no_model.model = None;
    let err = resolve_model(&no_model).await.unwrap_err();
    assert!(
        err.to_string().contains("needs --model owner/repo"),
        "{err}"
    );
    for (model, file, expected) in [
        (format!("{REPO}:Q8_0"), Some(Q8), "give one"),
        (format!("{REPO}:"), None, "quantization tag"),
        (REPO.to_string(), Some("model.safetensors"), "a .gguf file"),
        (REPO.to_string(), Some("../x.gguf"), "a .gguf file"),
        (
            REPO.to_string(),
            Some("m-Q8_0-00002-of-00003.gguf"),
            "m-Q8_0-00001-of-00003.gguf is the first of 3 parts",
        ),
    ] {
        let err = resolve_model(&request(&model, file, unused, tmp.path()))
            .await
            .unwrap_err();
        assert!(err.is_argument_error(), "{err:?}");
        assert!(
            err.to_string().contains(expected),
            "{model} {file:?}: {err}"
        );
    }
    // A safetensors repository: --gguf-file selects nothing there.
    let (hub, endpoint) = serve(named_hub(&[
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]))
    .await;
    let err = resolve_model(&request("org/safetensors", Some(Q8), &endpoint, tmp.path()))
        .await
        .unwrap_err();
    assert!(err.is_argument_error(), "{err:?}");
    assert!(
        err.to_string().contains("no .gguf file") && err.to_string().contains("drop --gguf-file"),
        "{err}"
    );
    assert!(hub.fetched_files().is_empty());
}

#[tokio::test]
async fn revision_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(gguf_hub()).await;
    let mut req = request(REPO, Some(Q8), &endpoint, tmp.path());
    req.revision = Some("v2".into());
    let model = resolve_model(&req).await.unwrap();
    assert_eq!(model.source, ModelSource::HubDownload);
    let requests = hub.requests.lock().unwrap().clone();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.contains(&format!("{REPO}@v2"))),
        "{requests:?}"
    );
    let repo_dir = tmp.path().join("hub/models--org--tiny-GGUF");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v2"))
            .unwrap()
            .trim(),
        SHA
    );
    assert!(!repo_dir.join("refs/main").exists());
    // Offline: v2 and its commit are cached, main is not.
    assert!(resolve_model(&offline(req.clone())).await.is_ok());
    req.revision = Some(SHA.into());
    assert!(resolve_model(&offline(req.clone())).await.is_ok());
    req.revision = None;
    let err = resolve_model(&offline(req)).await.unwrap_err();
    assert!(err.to_string().contains(&format!("{REPO}@main")), "{err}");
}

#[tokio::test]
async fn split_gguf_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, endpoint) = serve(named_hub(&[
        "m-Q8_0-00001-of-00002.gguf",
        "m-Q8_0-00002-of-00002.gguf",
        "m-Q4_0.gguf",
    ]))
    .await;
    let err = resolve_model(&request(
        &format!("{REPO}:Q8_0"),
        None,
        &endpoint,
        tmp.path(),
    ))
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(err.is_argument_error(), "{err:?}");
    assert!(
        msg.contains("m-Q8_0-00001-of-00002.gguf is the first of 2 parts")
            && msg.contains("llama-gguf-split --merge"),
        "{msg}"
    );
    assert!(hub.fetched_files().is_empty());
    // A local file whose metadata says it is one part of several (however it is named).
    let part = tmp.path().join("renamed.gguf");
    write_split_part(&part);
    let err = resolve_model(&request(
        part.to_str().unwrap(),
        None,
        &endpoint,
        tmp.path(),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, ResolveError::Gguf { .. }), "{err:?}");
    assert!(err.to_string().contains("one of 2 parts"), "{err}");
}

/// The fixture as GGUF with `split.count = 2` added to its metadata (what `gguf-split` writes).
fn write_split_part(out: &Path) {
    use candle_core::quantized::gguf_file::{self, Content, Value};

    let whole = tempfile::NamedTempFile::new().unwrap();
    medley_shard::fixture::write_gguf(&fixture_dir(), whole.path(), GgmlDType::F32).unwrap();
    let mut reader = std::io::BufReader::new(std::fs::File::open(whole.path()).unwrap());
    let content = Content::read(&mut reader).unwrap();
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("split.count".into(), Value::U16(2)));
    metadata.push(("split.no".into(), Value::U16(0)));
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content
                .tensor(&mut reader, name, &candle_core::Device::Cpu)
                .unwrap();
            (name.clone(), t)
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}
