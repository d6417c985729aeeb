//! Non-streamed generation, info, tokenize, metrics and health.

use serde_json::{Value, json};

use super::{LORAX_CLIENT_MERGED_BODY, lorax_client_base_body, post_json, post_sse};
use medley_spec::{Semantics, SignMethod, Strategy};

use crate::infer::testing::{FakeBackend, TestServer};
use crate::infer::{AdapterSource, AdapterSpec};

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .expect("ascii header")
}

#[tokio::test]
async fn lorax_client_body_gets_a_one_element_array() {
    let server = TestServer::start(FakeBackend::new()).await;
    let (status, headers, body) = post_json(&server.url("/"), &lorax_client_base_body(false)).await;
    assert_eq!(status, 200, "{body}");

    let requests = server.backend.requests();
    assert_eq!(requests.len(), 1);
    let ids = &requests[0].input_ids;
    // BOS + the literal `<s>` (an added special token) + 17 word pieces of the chat prompt;
    // max_new_tokens defaults to min(16, 64 - 19).
    assert_eq!(ids.len(), 19);
    assert_eq!(&ids[..2], &[1, 1]);
    assert_eq!(requests[0].stopping_parameters.max_new_tokens, 16);
    assert!(!requests[0].parameters.do_sample);

    let tokens: Vec<Value> = (0..16)
        .map(|i| {
            let t = FakeBackend::token(ids, i);
            json!({"id": t.id, "text": t.text, "logprob": -0.5, "special": false, "skipped": false})
        })
        .collect();
    let expected = json!([{
        "generated_text": FakeBackend::expected_text(ids, 16),
        "details": {
            "finish_reason": "length",
            "prompt_tokens": 19,
            "generated_tokens": 16,
            "skipped_tokens": 0,
            "seed": null,
            "prefill": [],
            "tokens": tokens,
        }
    }]);
    assert_eq!(body, expected);

    assert_eq!(header(&headers, "x-model-id"), "test/tiny-model");
    assert_eq!(header(&headers, "x-compute-type"), "cpu");
    assert_eq!(header(&headers, "x-prompt-tokens"), "19");
    assert_eq!(header(&headers, "x-generated-tokens"), "16");
    for name in [
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ] {
        let v: f64 = header(&headers, name).parse().expect("a number");
        assert!(v >= 0.0, "{name}");
    }
    // /invocations is the same route.
    let (status, _, again) =
        post_json(&server.url("/invocations"), &lorax_client_base_body(false)).await;
    assert_eq!(status, 200);
    assert_eq!(again, expected);
    server.stop().await;
}

#[tokio::test]
async fn lorax_client_merged_body_becomes_a_canonical_merge() {
    let server = TestServer::start(FakeBackend::new()).await;
    assert_eq!(
        LORAX_CLIENT_MERGED_BODY.len(),
        818,
        "the body as captured on the wire"
    );
    let (status, _, body) = post_json(&server.url("/"), LORAX_CLIENT_MERGED_BODY).await;
    assert_eq!(status, 200, "{body}");
    let requests = server.backend.requests();
    let AdapterSpec::Merged(m) = &requests[0].adapter else {
        panic!("a merge: {:?}", requests[0].adapter)
    };
    let ids: Vec<&str> = m.components.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "smangrul/tinyllama_lora_norobots",
            "smangrul/tinyllama_lora_sql",
            "smangrul/tinyllama_lora_adcopy"
        ]
    );
    assert!(m.components.iter().all(|c| c.source == AdapterSource::Hub));
    assert_eq!(m.merge.strategy, Strategy::Ties);
    assert_eq!(m.merge.weights, vec![2.0, 0.3, 0.7]);
    assert_eq!(m.merge.density, Some(0.2));
    assert_eq!(m.merge.sign_method, SignMethod::Total);
    assert_eq!(m.merge.semantics, Semantics::Peft);
    server.stop().await;
}

#[tokio::test]
async fn every_merge_field_survives_http_router_and_wire() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body = json!({"inputs": "hello", "parameters": {"max_new_tokens": 1, "merged_adapters": {
        "ids": ["org/a", "org/b"], "weights": [1.5, -0.25], "merge_strategy": "Dare_Ties_SVD",
        "density": 0.4, "majority_sign_method": "FREQUENCY", "seed": 99, "svd_rank": 6,
        "svd_clamp": 0.95}}});
    let (status, _, reply) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    let spec = server.backend.requests()[0].adapter.clone();
    let AdapterSpec::Merged(m) = &spec else {
        panic!("a merge: {spec:?}")
    };
    let expected = medley_spec::MergeSpec::new(Strategy::DareTiesSvd, vec![1.5, -0.25])
        .with_density(0.4)
        .with_sign_method(SignMethod::Frequency)
        .with_seed(99)
        .with_svd_rank(6)
        .with_svd_clamp(0.95);
    assert_eq!(m.merge, expected, "HTTP -> router");
    // Router -> shard: what the scheduler sends and the shard decodes (one conversion each).
    let wire = medley_spec::wire::spec_to_proto(&spec).expect("a loadable spec");
    let decoded = medley_spec::wire::spec_from_proto(Some(wire)).expect("the shard accepts it");
    assert_eq!(decoded, spec, "router -> proto -> shard");
    assert_eq!(decoded.key(), spec.key());
    server.stop().await;
}

#[tokio::test]
async fn generate_returns_an_object_with_every_detail() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body = json!({"inputs": "hello world", "parameters": {
        "max_new_tokens": 3, "details": true, "decoder_input_details": true,
        "return_k_alternatives": 2, "return_full_text": true, "seed": 5, "temperature": 0.5,
        "some_future_field": {"x": 1}
    }});
    let (status, headers, body) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 200, "{body}");
    // "hello world" → [<s>=1, hello=3, world=4]; generated token i is input token i.
    let alt = |id: u32| json!([{"id": id + 1, "text": " a1", "logprob": -1.0}, {"id": id + 2, "text": " a2", "logprob": -2.0}]);
    let tok = |id: u32| json!({"id": id, "text": format!(" t{id}"), "logprob": -0.5, "special": false, "alternative_tokens": alt(id), "skipped": false});
    let top = |id: u32| {
        json!([
            {"id": id + 1, "text": " a1", "logprob": -1.0, "special": false, "skipped": false},
            {"id": id + 2, "text": " a2", "logprob": -2.0, "special": false, "skipped": false}
        ])
    };
    let expected = json!({
        "generated_text": "hello world t1 t3 t4",
        "details": {
            "finish_reason": "length",
            "prompt_tokens": 3,
            "generated_tokens": 3,
            "skipped_tokens": 0,
            "seed": 5,
            "prefill": [
                {"id": 1, "text": "p1", "logprob": null},
                {"id": 3, "text": "p3", "logprob": -0.25},
                {"id": 4, "text": "p4", "logprob": -0.25}
            ],
            "tokens": [tok(1), tok(3), tok(4)],
            // TGI's form of the same alternatives.
            "top_tokens": [top(1), top(3), top(4)],
        }
    });
    assert_eq!(body, expected);
    assert_eq!(header(&headers, "x-total-tokens"), "6");
    let r = &server.backend.requests()[0];
    assert!(r.parameters.do_sample, "temperature 0.5 samples");
    assert_eq!((r.parameters.temperature, r.top_n_tokens), (0.5, 2));
    assert!(r.decoder_input_details);
    server.stop().await;
}

#[tokio::test]
async fn generate_without_details_and_with_null_parameters() {
    let server = TestServer::start(FakeBackend::new()).await;
    let (status, _, body) = post_json(
        &server.url("/generate"),
        r#"{"inputs": "hello", "parameters": null}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids = &server.backend.requests()[0].input_ids;
    assert_eq!(
        body,
        json!({"generated_text": FakeBackend::expected_text(ids, 16)})
    );
    let (status, _, _) = post_json(&server.url("/generate"), r#"{"inputs": "hello"}"#).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn stop_and_seed_reach_the_backend() {
    let server = TestServer::start(FakeBackend::new()).await;
    let body = json!({"inputs": "hello world", "parameters": {
        "stop": ["t3"], "seed": 42, "max_new_tokens": 10, "details": true, "ignore_eos_token": true,
        "repetition_penalty": 1.2, "top_k": 7, "top_p": 0.9, "typical_p": 0.5,
        "frequency_penalty": 0.5, "presence_penalty": -0.5, "truncate": 2
    }});
    let (status, _, body) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let r = &server.backend.requests()[0];
    assert_eq!(r.stopping_parameters.stop_sequences, vec!["t3".to_string()]);
    assert!(r.stopping_parameters.ignore_eos_token);
    let p = &r.parameters;
    assert_eq!(p.seed, 42);
    assert_eq!((p.top_k, p.top_p, p.typical_p), (7, 0.9, 0.5));
    assert_eq!(
        (
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty
        ),
        (1.2, 0.5, -0.5)
    );
    // truncate 2 keeps [hello, world] = [3, 4]; tokens are " t3", " t4" → stops after " t3".
    assert_eq!(r.input_ids, vec![3, 4]);
    assert_eq!(body["generated_text"], " t3");
    assert_eq!(body["details"]["finish_reason"], "stop_sequence");
    assert_eq!(body["details"]["seed"], 42);
    server.stop().await;
}

#[tokio::test]
async fn health_follows_the_backend() {
    let server = TestServer::start(FakeBackend::new()).await;
    let client = reqwest::Client::new();
    for path in ["/health", "/ping", "/"] {
        let resp = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.text().await.unwrap(), "");
    }
    server.backend.set_healthy(false);
    for path in ["/health", "/ping", "/"] {
        let resp = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 503, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": "unhealthy", "error_type": "healthcheck"})
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn info_tokenize_and_metrics() {
    let server = TestServer::start(FakeBackend::new()).await;
    let client = reqwest::Client::new();
    let info: Value = client
        .get(server.url("/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["model_id"], "test/tiny-model");
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(info["model_device_type"], "cpu");
    assert_eq!(info["model_pipeline_tag"], "text-generation");
    assert_eq!(info["max_input_length"], 32);
    assert_eq!(info["max_total_tokens"], 64);
    assert_eq!(info["max_concurrent_requests"], 8);
    assert_eq!(info["max_stop_sequences"], 4);
    assert_eq!(info["max_best_of"], 1);
    assert_eq!(
        info["max_batch_total_tokens"], 4096,
        "from the backend when not configured"
    );
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));

    let (status, _, tokens) =
        post_json(&server.url("/tokenize"), r#"{"inputs": "hello world"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(
        tokens,
        json!([
            {"id": 1, "text": "", "start": 0, "stop": 0},
            {"id": 3, "text": "hello", "start": 0, "stop": 5},
            {"id": 4, "text": "world", "start": 6, "stop": 11}
        ])
    );
    let (_, _, plain) = post_json(
        &server.url("/tokenize"),
        r#"{"inputs": "hello", "add_special_tokens": false}"#,
    )
    .await;
    assert_eq!(
        plain,
        json!([{"id": 3, "text": "hello", "start": 0, "stop": 5}])
    );

    let (status, _, _) = post_json(&server.url("/generate"), r#"{"inputs": "hello"}"#).await;
    assert_eq!(status, 200);
    let resp = client.get(server.url("/metrics")).send().await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for name in [
        "medley_request_count",
        "medley_request_success",
        "medley_request_duration_bucket",
        "medley_request_generated_tokens_bucket",
        "medley_request_input_length_bucket",
        "medley_request_validation_duration_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn details_report_the_prompt_tokens_taken_from_the_prefix_cache() {
    let server = TestServer::start(FakeBackend::new().with_cached_tokens(2)).await;
    let body =
        json!({"inputs": "hello world", "parameters": {"max_new_tokens": 2, "details": true}});
    let (status, _, reply) = post_json(&server.url("/generate"), &body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["details"]["prompt_tokens"], 3);
    assert_eq!(reply["details"]["cached_tokens"], 2);
    let (status, _, events) = post_sse(&server.url("/generate_stream"), &body.to_string()).await;
    assert_eq!(status, 200);
    let last = events.last().expect("events");
    assert_eq!(last["details"]["cached_tokens"], 2, "{last}");
    assert!(events[0]["details"].is_null());
    server.stop().await;
}
