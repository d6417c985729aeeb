//! Adapter management end to end: `--pin-adapters` at start-up, `GET /v1/adapters` (bytes,
//! state, pin, last use), preloads of an adapter and of a merge that later requests hit without
//! a load, unloads by key and by adapter fields, the admin key on HTTP and gRPC, and
//! `--disable-admin`; a start-up preload that cannot load stops the server.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::{Server, ServerOptions, fixture_adapters, tiny_model_dir};
use medley_proto::v1 as pb;
use medley_proto::v1::adapter_service_client::AdapterServiceClient;
use serde_json::{Value, json};

const API_KEY: &str = "user-key";
const ADMIN_KEY: &str = "admin-key";

fn options(extra: &[&str]) -> ServerOptions {
    let mut args = vec![
        "--adapter-root".to_string(),
        fixture_adapters().display().to_string(),
        "--default-adapter-source".into(),
        "local".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    ServerOptions {
        model: Some(tiny_model_dir()),
        args,
        ..Default::default()
    }
}

/// A call with `key` as the bearer token: status and JSON body (`null` when not JSON).
async fn call(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = s
        .client
        .request(method, format!("{}{path}", s.http))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn list(s: &Server) -> Value {
    let (status, body) = call(s, reqwest::Method::GET, "/v1/adapters", ADMIN_KEY, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The listed adapter whose only (or first) component is `id`, for a kind.
fn find<'a>(list: &'a Value, kind: &str, id: &str) -> Option<&'a Value> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == kind && a["adapters"][0]["id"] == id)
}

async fn generate(s: &Server, adapter: Value) -> Value {
    let mut parameters = json!({"max_new_tokens": 4});
    parameters
        .as_object_mut()
        .unwrap()
        .extend(adapter.as_object().unwrap().clone());
    let (status, body) = call(
        s,
        reqwest::Method::POST,
        "/generate",
        API_KEY,
        Some(json!({"inputs": "Once upon a time", "parameters": parameters})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn misses(s: &Server) -> f64 {
    s.metric("medley_adapter_cache_misses")
        .await
        .unwrap()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_pinned_preloaded_listed_and_unloaded() {
    let s = Server::start(options(&[
        "--pin-adapters",
        "local:a_r4",
        "--api-key",
        API_KEY,
        "--admin-api-key",
        ADMIN_KEY,
    ]))
    .await
    .unwrap();

    // The pinned adapter is resident before the server answers.
    let before = list(&s).await;
    let pinned = find(&before, "single", "a_r4").expect("a_r4 listed");
    assert_eq!(pinned["state"], "resident", "{pinned}");
    assert_eq!(pinned["pinned"], true);
    assert!(pinned["bytes"].as_u64().unwrap() > 0, "{pinned}");
    assert!(pinned["slot"].as_u64().unwrap() >= 1);
    assert!(before["slots"]["total"].as_u64().unwrap() >= 2, "{before}");
    assert_eq!(before["slots"]["used"], 1);
    assert_eq!(before["memory"]["used_bytes"], pinned["bytes"]);

    // Management routes take the admin key only; generation takes the API key only.
    for key in [API_KEY, "nope"] {
        let (status, _) = call(&s, reqwest::Method::GET, "/v1/adapters", key, None).await;
        assert_eq!(status, 401, "{key}");
    }
    let (status, _) = call(
        &s,
        reqwest::Method::POST,
        "/generate",
        ADMIN_KEY,
        Some(json!({"inputs": "hi"})),
    )
    .await;
    assert_eq!(status, 401);

    // Preload an adapter and a merge: later requests hit them without a load.
    let (status, single) = call(
        &s,
        reqwest::Method::POST,
        "/v1/adapters/preload",
        ADMIN_KEY,
        Some(json!({"adapter_id": "e_r2"})),
    )
    .await;
    assert_eq!(status, 200, "{single}");
    assert_eq!(single["state"], "resident");
    assert_eq!(single["pinned"], false);
    let merge = json!({"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 0.5],
                       "merge_strategy": "linear"});
    let (status, merged) = call(
        &s,
        reqwest::Method::POST,
        "/v1/adapters/preload",
        ADMIN_KEY,
        Some(json!({"merged_adapters": merge})),
    )
    .await;
    assert_eq!(status, 200, "{merged}");
    assert_eq!(merged["kind"], "merged");
    assert_eq!(merged["merge_strategy"], "linear");
    assert_eq!(merged["adapters"][1]["weight"], 0.5);
    let misses_before = misses(&s).await;
    generate(&s, json!({"adapter_id": "e_r2"})).await;
    generate(&s, json!({"merged_adapters": merge})).await;
    assert_eq!(
        misses(&s).await,
        misses_before,
        "preloaded: no load on first use"
    );

    // One adapter by key: its last use moved, nothing runs on it.
    let key = single["key"].as_str().unwrap();
    let (status, one) = call(
        &s,
        reqwest::Method::GET,
        &format!("/v1/adapters/{}", &key[..12]),
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["key"], key);
    assert!(one["last_used"].as_u64().unwrap() >= single["last_used"].as_u64().unwrap());
    assert_eq!(
        (one["running"].as_u64(), one["queued"].as_u64()),
        (Some(0), Some(0))
    );

    // Unload by key, and by adapter fields; the next request loads again.
    let (status, gone) = call(
        &s,
        reqwest::Method::DELETE,
        &format!("/v1/adapters/{key}"),
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200, "{gone}");
    assert_eq!(gone["state"], "evicted");
    let (status, gone) = call(
        &s,
        reqwest::Method::POST,
        "/v1/adapters/unload",
        ADMIN_KEY,
        Some(json!({"adapter_id": "a_r4"})),
    )
    .await;
    assert_eq!(status, 200, "{gone}");
    assert_eq!(
        (gone["state"].as_str(), gone["pinned"].as_bool()),
        (Some("evicted"), Some(false))
    );
    let after = list(&s).await;
    assert_eq!(find(&after, "single", "e_r2").unwrap()["state"], "evicted");
    assert_eq!(
        find(&after, "merged", "strong_a_r8").unwrap()["state"],
        "resident"
    );
    let misses_before = misses(&s).await;
    generate(&s, json!({"adapter_id": "e_r2"})).await;
    assert_eq!(
        misses(&s).await,
        misses_before + 1.0,
        "unloaded: loaded again"
    );

    // Errors: an unknown adapter (404), the base model (400), an unknown key (404).
    let (status, body) = call(
        &s,
        reqwest::Method::POST,
        "/v1/adapters/preload",
        ADMIN_KEY,
        Some(json!({"adapter_id": "no_such_adapter"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no_such_adapter")
    );
    let (status, body) = call(
        &s,
        reqwest::Method::POST,
        "/v1/adapters/preload",
        ADMIN_KEY,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(
        &s,
        reqwest::Method::DELETE,
        "/v1/adapters/0000000000000000",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // gRPC: the same list, behind the admin key.
    let mut client = AdapterServiceClient::new(s.grpc_channel().await.unwrap());
    let refused = client
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .expect_err("no key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListAdaptersRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_KEY}").parse().unwrap(),
    );
    let listed = client.list_adapters(req).await.unwrap().into_inner();
    let m = listed
        .adapters
        .iter()
        .find(|a| a.kind == "merged")
        .expect("the merge");
    assert_eq!(m.state, "resident");
    assert_eq!(m.key, merged["key"].as_str().unwrap());
    assert_eq!(
        listed.max_slots as u64,
        after["slots"]["total"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_admin_is_404_and_a_bad_preload_stops_the_start() {
    let s = Server::start(options(&["--disable-admin"])).await.unwrap();
    for path in ["/v1/adapters", "/v1/merges"] {
        let (status, _) = s.get(path).await.unwrap();
        assert_eq!(status, 404, "{path}");
    }
    generate_open(&s).await;
    let mut client = AdapterServiceClient::new(s.grpc_channel().await.unwrap());
    let err = client
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .expect_err("not served");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    drop(s);

    let failed = Server::start(options(&["--preload-adapters", "no_such_adapter"])).await;
    let err = failed.err().expect("the start fails").to_string();
    assert!(err.contains("exited before becoming healthy"), "{err}");
}

/// A `/generate` on the base model without a key.
async fn generate_open(s: &Server) {
    let r = s
        .post(
            "/generate",
            &json!({"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}
