//! API keys on HTTP and gRPC, and the request size limit, over loopback.

use medley_proto::v1 as pb;
use medley_proto::v1::adapter_service_client::AdapterServiceClient;
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic_health::pb::health_client::HealthClient;

use crate::access::{AccessArgs, DEFAULT_MAX_REQUEST_BYTES};
use crate::infer::testing::{FakeBackend, TestServer, test_limits};

async fn server(max_request_bytes: usize) -> TestServer {
    server_with(AccessArgs {
        api_keys: vec!["sesame".into()],
        api_key_file: None,
        metrics_require_key: false,
        max_request_bytes,
        disable_admin: false,
        admin_api_keys: vec![],
    })
    .await
}

async fn server_with(args: AccessArgs) -> TestServer {
    let access = args.into_config().expect("access");
    TestServer::start_configured(FakeBackend::new(), test_limits(), &[], |c| {
        c.access = access
    })
    .await
}

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Option<String>, Value) {
    let mut req = reqwest::Client::new().request(method, server.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.expect("text");
    (
        status,
        challenge,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn keys_guard_every_route_but_health_and_metrics() {
    let s = server(DEFAULT_MAX_REQUEST_BYTES).await;
    let generate = json!({"inputs": "hello world", "parameters": {"max_new_tokens": 2}});
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    for key in [None, Some("wrong")] {
        let (status, challenge, body) =
            send(&s, post.clone(), "/generate", key, Some(&generate)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        assert_eq!(body["error_type"], "unauthorized", "{body}");
        let (status, _, body) = send(&s, get.clone(), "/v1/models", key, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    let (status, _, body) = send(
        &s,
        post.clone(),
        "/generate",
        Some("sesame"),
        Some(&generate),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = send(&s, get.clone(), "/v1/models", Some("sesame"), None).await;
    assert_eq!(status, StatusCode::OK);
    for open in ["/health", "/ping", "/", "/metrics"] {
        let (status, _, _) = send(&s, get.clone(), open, None, None).await;
        assert_eq!(status, StatusCode::OK, "{open}");
    }

    // gRPC: generation needs the key; health does not.
    let channel = tonic::transport::Channel::from_shared(s.grpc_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = GenerationServiceClient::new(channel.clone());
    let request = || pb::GenerateRequest {
        inputs: "hello world".into(),
        parameters: Some(pb::GenerateParameters {
            max_new_tokens: Some(2),
            ..Default::default()
        }),
    };
    let refused = client.generate(request()).await.expect_err("no key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut with_key = tonic::Request::new(request());
    with_key
        .metadata_mut()
        .insert("authorization", "Bearer sesame".parse().expect("metadata"));
    client.generate(with_key).await.expect("with the key");
    let mut health = HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is open");
    s.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let s = server(256).await;
    let big = json!({"inputs": "x".repeat(1000), "parameters": {"max_new_tokens": 1}});
    let (status, _, _) = send(
        &s,
        reqwest::Method::POST,
        "/generate",
        Some("sesame"),
        Some(&big),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, body) = send(
        &s,
        reqwest::Method::POST,
        "/v1/completions",
        Some("sesame"),
        Some(&json!({"prompt": "x".repeat(1000)})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    s.stop().await;
}

fn admin_args(disable_admin: bool, admin_api_keys: &[&str]) -> AccessArgs {
    AccessArgs {
        api_keys: vec!["sesame".into()],
        api_key_file: None,
        metrics_require_key: false,
        max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        disable_admin,
        admin_api_keys: admin_api_keys.iter().map(|k| k.to_string()).collect(),
    }
}

#[tokio::test]
async fn management_routes_take_the_admin_key_when_one_is_set() {
    let s = server_with(admin_args(false, &["root"])).await;
    let get = reqwest::Method::GET;
    for path in ["/v1/adapters", "/v1/merges"] {
        for key in [None, Some("sesame"), Some("wrong")] {
            let (status, challenge, body) = send(&s, get.clone(), path, key, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {key:?}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"));
        }
        let (status, _, body) = send(&s, get.clone(), path, Some("root"), None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["object"], "list", "{body}");
    }
    // The admin key is not an API key.
    let generate = json!({"inputs": "hello world", "parameters": {"max_new_tokens": 2}});
    let (status, _, _) = send(
        &s,
        reqwest::Method::POST,
        "/generate",
        Some("root"),
        Some(&generate),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // gRPC: the management services want the admin key too.
    let channel = tonic::transport::Channel::from_shared(s.grpc_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut adapters = AdapterServiceClient::new(channel);
    for (key, code) in [
        ("sesame", Some(tonic::Code::Unauthenticated)),
        ("root", None),
    ] {
        let mut req = tonic::Request::new(pb::ListAdaptersRequest {});
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("metadata"),
        );
        match (adapters.list_adapters(req).await, code) {
            (Ok(_), None) => {}
            (Err(e), Some(code)) => assert_eq!(e.code(), code),
            (other, _) => panic!("{key}: {other:?}"),
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn disabled_management_routes_are_absent() {
    let s = server_with(admin_args(true, &[])).await;
    for (method, path) in [
        (reqwest::Method::GET, "/v1/adapters"),
        (reqwest::Method::POST, "/v1/adapters/preload"),
        (reqwest::Method::DELETE, "/v1/adapters/0123456789ab"),
        (reqwest::Method::GET, "/v1/merges"),
        (reqwest::Method::POST, "/v1/merges"),
    ] {
        let (status, _, body) = send(&s, method, path, Some("sesame"), Some(&json!({}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let channel = tonic::transport::Channel::from_shared(s.grpc_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut req = tonic::Request::new(pb::ListAdaptersRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer sesame".parse().expect("metadata"));
    let err = AdapterServiceClient::new(channel)
        .list_adapters(req)
        .await
        .expect_err("not served");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    s.stop().await;
}

#[test]
fn an_admin_key_with_admin_disabled_is_a_config_error() {
    assert!(admin_args(true, &["root"]).into_config().is_err());
}
