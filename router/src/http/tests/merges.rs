//! `/v1/merges` and named merges used as `model` (OpenAI) and `adapter_id` (LoRAX): a name
//! reaches the backend as the very merge the equivalent inline request names (same key).

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::post_json;
use crate::infer::testing::{FakeBackend, TestServer};

async fn get(server: &TestServer, path: &str) -> (StatusCode, Value) {
    let resp = reqwest::get(server.url(path)).await.expect("get");
    (resp.status(), resp.json().await.expect("json"))
}

async fn delete(server: &TestServer, path: &str) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .delete(server.url(path))
        .send()
        .await
        .expect("delete");
    (resp.status(), resp.json().await.expect("json"))
}

async fn post(server: &TestServer, path: &str, body: &Value) -> (StatusCode, Value) {
    let (status, _, reply) = post_json(&server.url(path), &body.to_string()).await;
    (status, reply)
}

fn merge_spec() -> Value {
    json!({"ids": ["org/a", "org/b"], "weights": [1.0, 0.5], "merge_strategy": "ties",
           "density": 0.5})
}

#[tokio::test]
async fn create_list_get_delete() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body = json!({"name": "team/sql-ads", "merged_adapters": merge_spec()});
    let (status, created) = post(&server, "/v1/merges", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["object"], "merge");
    assert_eq!(created["name"], "team/sql-ads");
    assert_eq!(created["merged_adapters"]["ids"], json!(["org/a", "org/b"]));
    let key = created["key"].as_str().expect("key").to_string();
    assert_eq!(key.len(), 12);

    let (status, again) = post(&server, "/v1/merges", &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], "merge_exists");

    let (status, list) = get(&server, "/v1/merges").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
    let (status, one) = get(&server, "/v1/merges/team/sql-ads").await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["key"], key.as_str());
    // The merge is a model too.
    let (_, models) = get(&server, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["test/tiny-model", "team/sql-ads"]);

    let (status, gone) = delete(&server, "/v1/merges/team/sql-ads").await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(
        gone,
        json!({"id": "team/sql-ads", "object": "merge", "deleted": true})
    );
    let (status, missing) = get(&server, "/v1/merges/team/sql-ads").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    assert_eq!(missing["error"]["code"], "merge_not_found");
    let (status, _) = delete(&server, "/v1/merges/team/sql-ads").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn invalid_names_and_specs_are_400s() {
    let server = TestServer::start(FakeBackend::new()).await;
    let cases = [
        json!({"name": "bad name", "merged_adapters": merge_spec()}),
        json!({"name": "test/tiny-model", "merged_adapters": merge_spec()}),
        json!({"name": "m", "merged_adapters": {"ids": ["org/a", "org/b"], "weights": [1.0]}}),
        json!({"name": "m", "merged_adapters": {"ids": ["org/a"], "weights": [1.0],
               "merge_strategy": "nonsense"}}),
        json!({"name": "m", "merged_adapters": merge_spec(), "extra": 1}),
        json!({"merged_adapters": merge_spec()}),
    ];
    for body in cases {
        let (status, reply) = post(&server, "/v1/merges", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");
    }
    let (_, list) = get(&server, "/v1/merges").await;
    assert_eq!(list["data"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn a_name_is_the_inline_merge_on_every_route() {
    let backend = FakeBackend::new();
    let server = TestServer::start(backend.clone()).await;
    let (status, _) = post(
        &server,
        "/v1/merges",
        &json!({"name": "sql-ads", "merged_adapters": merge_spec()}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let params = |adapter: Value| {
        let mut p = json!({"max_new_tokens": 2});
        if let (Some(p), Some(a)) = (p.as_object_mut(), adapter.as_object()) {
            p.extend(a.clone());
        }
        p
    };
    let requests = [
        (
            "/generate",
            json!({"inputs": "hello world",
            "parameters": params(json!({"merged_adapters": merge_spec()}))}),
        ),
        (
            "/generate",
            json!({"inputs": "hello world",
            "parameters": params(json!({"adapter_id": "sql-ads"}))}),
        ),
        (
            "/v1/completions",
            json!({"model": "sql-ads", "prompt": "hello world",
            "max_tokens": 2, "temperature": 0}),
        ),
    ];
    for (path, body) in &requests {
        let (status, reply) = post(&server, path, body).await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {reply}");
    }
    let keys: Vec<_> = backend.requests().iter().map(|r| r.adapter.key()).collect();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert_ne!(keys[0], medley_spec::AdapterKey::base());

    // A name and an inline merge together conflict; a name with a different source is refused
    // like the inline spec would be.
    let (status, reply) = post(
        &server,
        "/generate",
        &json!({"inputs": "hi", "parameters": params(json!({"adapter_id": "sql-ads",
            "merged_adapters": merge_spec()}))}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    server.stop().await;
}
