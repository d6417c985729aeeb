//! S3 adapters end to end, against moto's S3-compatible server with authentication on
//! (`tests/python/s3_server.py`, from the `MEDLEY_PYTHON` venv): an adapter uploaded to a bucket
//! is served by its `s3://bucket/prefix` id with the tokens of the same adapter served from a
//! local directory (REST, OpenAI, gRPC, inline and named merges); a new server process on the same
//! cache lists the prefix but downloads nothing; a missing prefix, a missing object, a missing
//! bucket, credentials S3 refuses and missing credentials each give a clear 4xx and leave the
//! cache empty.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use medley_e2e::{
    Server, ServerOptions, fixture_adapters, free_port, python_with_lorax_client, tiny_model_dir,
    token_ids, workspace_root,
};
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_proto::v1::{GenerateParameters, GenerateRequest};
use serde_json::{Value, json};

const BUCKET: &str = "adapters";
const A: &str = "strong_a_r8";
const B: &str = "strong_b_r8_attn";

/// A running `s3_server.py` (moto) with the fixture adapters `A` and `B` under `team/`, and
/// `team/partial/` holding only an `adapter_config.json`.
struct S3Server {
    child: Child,
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    fn start() -> anyhow::Result<Self> {
        let python = python_with_lorax_client()?;
        let dir = tempfile::tempdir()?;
        let partial = dir.path().join("partial");
        std::fs::create_dir(&partial)?;
        std::fs::copy(
            fixture_adapters().join(A).join("adapter_config.json"),
            partial.join("adapter_config.json"),
        )?;
        let log = dir.path().join("moto.log");
        let port = free_port()?;
        let mut cmd = Command::new(python);
        cmd.arg(workspace_root().join("tests/python/s3_server.py"))
            .arg(port.to_string())
            .arg(BUCKET);
        for name in [A, B] {
            cmd.arg(format!(
                "team/{name}={}",
                fixture_adapters().join(name).display()
            ));
        }
        cmd.arg(format!("team/partial={}", partial.display()));
        let mut child = cmd
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with('{') {
                    let _ = tx.send(line);
                    break;
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "s3_server.py did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let info: Value = serde_json::from_str(&line)?;
        let field = |k: &str| info[k].as_str().unwrap_or_default().to_string();
        Ok(Self {
            endpoint: field("endpoint"),
            access_key_id: field("access_key_id"),
            secret_access_key: field("secret_access_key"),
            child,
            log,
            _dir: dir,
        })
    }

    /// Requests in moto's log that contain every one of `parts`.
    fn requests(&self, parts: &[&str]) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Successful GETs of the weights of adapter `name`.
    fn weight_downloads(&self, name: &str) -> usize {
        self.requests(&[
            &format!("\"GET /{BUCKET}/team/{name}/adapter_model.safetensors "),
            "\" 200 ",
        ])
    }

    /// Listings of the prefix of adapter `name`.
    fn listings(&self, name: &str) -> usize {
        // Werkzeug logs the query decoded.
        self.requests(&[
            &format!("GET /{BUCKET}?"),
            "list-type=2",
            &format!("prefix=team/{name}/"),
        ])
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Closing its standard input stops the server; kill it if it lingers.
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_id(name: &str) -> String {
    format!("s3://{BUCKET}/team/{name}")
}

/// `medley serve` on the tiny model with the fixture adapters as its local root, S3 access from
/// `env` (every AWS variable given, empty ones unset) and the S3 cache at `cache`.
async fn server(s3: &S3Server, key: &str, secret: &str, cache: &Path) -> Server {
    let env = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_SESSION_TOKEN", ""),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ENDPOINT_URL_S3", ""),
        ("MEDLEY_S3_CACHE", cache.to_str().unwrap()),
    ];
    Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: vec![
            "--adapter-root".into(),
            fixture_adapters().display().to_string(),
        ],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Everything under `dir` (nothing when it does not exist).
fn cached(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(read) = std::fs::read_dir(dir) {
        for e in read.flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                out.extend(cached(&e.path()));
            }
        }
    }
    out
}

fn body(adapter: Value) -> Value {
    let mut parameters = json!({"max_new_tokens": 8, "details": true, "ignore_eos_token": true});
    parameters
        .as_object_mut()
        .unwrap()
        .extend(adapter.as_object().unwrap().clone());
    json!({"inputs": "Once upon a time", "parameters": parameters})
}

/// Greedy `/generate` with `adapter` fields: status and body.
async fn generate(s: &Server, adapter: Value) -> (u16, Value) {
    let r = s.post("/generate", &body(adapter)).await.unwrap();
    (r.status, r.body)
}

async fn tokens(s: &Server, adapter: Value) -> Vec<u64> {
    let (status, reply) = generate(s, adapter).await;
    assert_eq!(status, 200, "{reply}");
    token_ids(&reply)
}

fn merge(ids: [String; 2]) -> Value {
    json!({"ids": ids, "weights": [1.0, 0.7], "merge_strategy": "ties", "density": 0.5})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_adapters_match_local_ones_are_cached_and_fail_clearly() {
    let s3 = tokio::task::spawn_blocking(S3Server::start)
        .await
        .unwrap()
        .expect("moto S3 server (tests/python/requirements.txt)");
    let caches = tempfile::tempdir().unwrap();
    let cache = caches.path().join("good");
    let s = server(&s3, &s3.access_key_id, &s3.secret_access_key, &cache).await;

    // A missing prefix and a missing bucket: 404 naming what is missing; an id that is not
    // `s3://bucket/prefix`: a validation error. Nothing is cached for any of them.
    let (status, reply) = generate(
        &s,
        json!({"adapter_id": s3_id("missing"), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error_type"], "not_found");
    let message = reply["error"].as_str().unwrap();
    assert!(
        message.contains("no object under s3://adapters/team/missing/"),
        "{message}"
    );
    let (status, reply) = generate(
        &s,
        json!({"adapter_id": s3_id("partial"), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(status, 404, "{reply}");
    let message = reply["error"].as_str().unwrap();
    assert!(
        message.contains("s3://adapters/team/partial/ has no adapter_model.safetensors"),
        "{message}"
    );
    let (status, reply) = generate(
        &s,
        json!({"adapter_id": format!("s3://no-such-bucket/team/{A}"), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("bucket no-such-bucket does not exist"),
        "{reply}"
    );
    let (status, reply) = generate(
        &s,
        json!({"adapter_id": format!("{BUCKET}/team/{A}"), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("is not a valid S3 adapter id (`s3://bucket/prefix`"),
        "{reply}"
    );
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": "adapters/x", "adapter_source": "s3", "prompt": "Hi", "max_tokens": 2}),
        )
        .await
        .unwrap();
    // As an OpenAI `model`, an id that cannot exist is an unknown model, as for other sources.
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "model_not_found", "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a valid S3 adapter id"),
        "{}",
        r.body
    );
    assert!(cached(&cache).is_empty(), "{:?}", cached(&cache));
    assert_eq!(s3.weight_downloads(A), 0);

    // The adapter from S3 is the adapter from the local directory.
    let base = tokens(&s, json!({})).await;
    let local = tokens(&s, json!({"adapter_id": A, "adapter_source": "local"})).await;
    assert_ne!(local, base, "the fixture adapter changes the greedy tokens");
    let from_s3 = tokens(&s, json!({"adapter_id": s3_id(A), "adapter_source": "s3"})).await;
    assert_eq!(from_s3, local);
    assert_eq!(s3.weight_downloads(A), 1);
    let dirs: Vec<PathBuf> = cached(&cache)
        .into_iter()
        .filter(|p| p.join("adapter_model.safetensors").is_file())
        .collect();
    assert_eq!(dirs.len(), 1, "{:?}", cached(&cache));
    assert!(dirs[0].starts_with(cache.join(BUCKET)), "{dirs:?}");
    // The same id with a trailing slash is the same adapter (normalised by validation).
    let slash = tokens(
        &s,
        json!({"adapter_id": format!("{}/", s3_id(A)), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(slash, local);

    // A merge of S3 components: its components resolve again (listing A's prefix) but only B
    // is downloaded; the tokens are those of the same merge of local adapters.
    let listed = s3.listings(A);
    let local_merge = tokens(
        &s,
        json!({"merged_adapters": merge([A.into(), B.into()]), "adapter_source": "local"}),
    )
    .await;
    let s3_merge = tokens(
        &s,
        json!({"merged_adapters": merge([s3_id(A), s3_id(B)]), "adapter_source": "s3"}),
    )
    .await;
    assert_eq!(s3_merge, local_merge);
    assert!(s3.listings(A) > listed, "A's prefix was listed again");
    assert_eq!((s3.weight_downloads(A), s3.weight_downloads(B)), (1, 1));

    // A named merge of S3 components, and the OpenAI route with an S3 adapter.
    let r = s
        .post(
            "/v1/merges",
            &json!({"name": "s3-merge", "adapter_source": "s3",
                    "merged_adapters": merge([s3_id(A), s3_id(B)])}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        tokens(&s, json!({"adapter_id": "s3-merge"})).await,
        s3_merge
    );
    let completion = |model: String, source: &'static str| {
        let s = &s;
        async move {
            let r = s
                .post(
                    "/v1/completions",
                    &json!({"model": model, "adapter_source": source, "prompt": "Once upon a time",
                            "max_tokens": 8, "temperature": 0}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.body["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(
        completion(s3_id(A), "s3").await,
        completion(A.into(), "local").await
    );

    // gRPC with adapter_source "s3".
    let mut client = GenerationServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let grpc_request = |id: String| GenerateRequest {
        inputs: "Once upon a time".into(),
        parameters: Some(GenerateParameters {
            adapter_id: Some(id),
            adapter_source: Some("s3".into()),
            max_new_tokens: Some(8),
            ignore_eos_token: true,
            details: true,
            ..Default::default()
        }),
    };
    let reply = client
        .generate(grpc_request(s3_id(A)))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u64> = reply
        .details
        .unwrap()
        .tokens
        .iter()
        .map(|t| u64::from(t.id))
        .collect();
    assert_eq!(ids, local);
    let status = client
        .generate(grpc_request(format!("{BUCKET}/team/{A}")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    drop(client);
    drop(s);

    // A new server process on the same cache: the prefix is listed, nothing is downloaded.
    let listed = s3.listings(A);
    let s = server(&s3, &s3.access_key_id, &s3.secret_access_key, &cache).await;
    assert_eq!(
        tokens(&s, json!({"adapter_id": s3_id(A), "adapter_source": "s3"})).await,
        local
    );
    assert!(s3.listings(A) > listed);
    assert_eq!((s3.weight_downloads(A), s3.weight_downloads(B)), (1, 1));
    drop(s);

    // Credentials S3 refuses (the right key id with a wrong secret): 403 (gRPC
    // PERMISSION_DENIED) saying what to check, no secret in it, nothing cached.
    let wrong_secret = "wrong-secret-value-0123456789";
    let bad_cache = caches.path().join("bad");
    let s = server(&s3, &s3.access_key_id, wrong_secret, &bad_cache).await;
    let (status, reply) =
        generate(&s, json!({"adapter_id": s3_id(A), "adapter_source": "s3"})).await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error_type"], "access_denied");
    let message = reply["error"].as_str().unwrap();
    assert!(
        message.contains("SignatureDoesNotMatch") && message.contains("AWS_SECRET_ACCESS_KEY"),
        "{message}"
    );
    assert!(
        !message.contains(wrong_secret) && !message.contains(&s3.secret_access_key),
        "{message}"
    );
    let mut client = GenerationServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let status = client.generate(grpc_request(s3_id(B))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(cached(&bad_cache).is_empty(), "{:?}", cached(&bad_cache));
    drop(client);
    drop(s);

    // An unknown access key: 403 as well.
    let s = server(&s3, "AKIAUNKNOWNKEY000000", wrong_secret, &bad_cache).await;
    let (status, reply) =
        generate(&s, json!({"adapter_id": s3_id(A), "adapter_source": "s3"})).await;
    assert_eq!(status, 403, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("InvalidAccessKeyId"),
        "{reply}"
    );
    assert!(cached(&bad_cache).is_empty(), "{:?}", cached(&bad_cache));
    drop(s);

    // No credentials at all: an error naming the variables to set.
    let s = server(&s3, "", "", &bad_cache).await;
    let (status, reply) =
        generate(&s, json!({"adapter_id": s3_id(A), "adapter_source": "s3"})).await;
    assert_eq!(status, 424, "{reply}");
    let message = reply["error"].as_str().unwrap();
    assert!(
        message.contains("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{message}"
    );
    assert!(cached(&bad_cache).is_empty(), "{:?}", cached(&bad_cache));
    assert_eq!((s3.weight_downloads(A), s3.weight_downloads(B)), (1, 1));
}
