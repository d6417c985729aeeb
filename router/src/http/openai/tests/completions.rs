//! `/v1/completions` (JSON) and `/v1/models`.

use serde_json::json;

use super::{chunks, post, post_stream, server};
use crate::infer::testing::{FakeBackend, TEST_MODEL_ID};
use crate::infer::{AdapterSource, AdapterSpec};

#[tokio::test]
async fn completion_has_openai_shape_usage_and_greedy_parameters() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"model": TEST_MODEL_ID, "prompt": "hello world", "max_tokens": 3,
        "temperature": 0, "user": "u-1"});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    let id = reply["id"].as_str().expect("id");
    assert!(id.starts_with("cmpl-"), "{id}");
    assert!(reply["created"].as_u64().expect("created") > 1_700_000_000);
    assert_eq!(reply["object"], "text_completion");
    assert_eq!(reply["model"], TEST_MODEL_ID);
    assert_eq!(
        reply["choices"],
        json!([{"index": 0, "text": " t1 t3 t4", "logprobs": null, "finish_reason": "length"}])
    );
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    let requests = server.backend.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.input_ids, vec![1, 3, 4], "BOS added for completions");
    assert!(!r.parameters.do_sample, "temperature 0 is greedy");
    assert_eq!(r.adapter, AdapterSpec::Base);
    server.stop().await;
}

#[tokio::test]
async fn sampling_is_the_default_and_parameters_map() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"prompt": "hello", "max_tokens": 2, "top_p": 0.9,
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "stop": ["x", "y"],
        "response_format": {"type": "text"}, "logit_bias": {}});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["model"], TEST_MODEL_ID,
        "a missing model is the base model"
    );
    let r = &server.backend.requests()[0];
    assert!(r.parameters.do_sample);
    assert_eq!(r.parameters.top_p, 0.9);
    assert_eq!(
        (
            r.parameters.presence_penalty,
            r.parameters.frequency_penalty
        ),
        (0.5, -0.25)
    );
    assert_eq!(r.stopping_parameters.stop_sequences, vec!["x", "y"]);
    assert_eq!(r.stopping_parameters.max_new_tokens, 2);
    server.stop().await;
}

#[tokio::test]
async fn n_choices_get_consecutive_seeds_and_count_the_prompt_once() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"prompt": "hello world", "max_tokens": 2, "n": 2, "seed": 5,
        "temperature": 0.7});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], " t1 t3");
    }
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
    );
    let mut seeds: Vec<u64> = server
        .backend
        .requests()
        .iter()
        .map(|r| r.parameters.seed)
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, vec![5, 6]);
    // Greedy n > 1: identical choices.
    let greedy = json!({"prompt": "hello", "max_tokens": 2, "n": 3, "temperature": 0});
    let (status, reply) = post(&server, "/v1/completions", &greedy).await;
    assert_eq!(status, 200, "{reply}");
    let texts: Vec<_> = reply["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!(" t1 t3"); 3]);
    server.stop().await;
}

#[tokio::test]
async fn several_prompts_are_choice_groups() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"prompt": ["hello world", "world"], "max_tokens": 1, "n": 2});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    let texts: Vec<_> = reply["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| (c["index"].clone(), c["text"].clone()))
        .collect();
    assert_eq!(
        texts,
        vec![
            (json!(0), json!(" t1")),
            (json!(1), json!(" t1")),
            (json!(2), json!(" t1")),
            (json!(3), json!(" t1")),
        ]
    );
    assert_eq!(reply["usage"]["prompt_tokens"], 3 + 2);
    assert_eq!(reply["usage"]["completion_tokens"], 4);
    server.stop().await;
}

#[tokio::test]
async fn stop_sequences_are_cut_from_the_text() {
    let server = server(FakeBackend::new(), None).await;
    for stop in [json!(" t4"), json!(["zzz", " t4"])] {
        let body = json!({"prompt": "hello world", "max_tokens": 6, "stop": stop});
        let (status, reply) = post(&server, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["choices"][0]["text"], " t1 t3", "{stop}");
        assert_eq!(reply["choices"][0]["finish_reason"], "stop");
        assert_eq!(reply["usage"]["completion_tokens"], 3);
    }
    server.stop().await;
}

#[tokio::test]
async fn logprobs_take_the_legacy_shape() {
    let server = server(FakeBackend::new(), None).await;
    let body = json!({"prompt": "hello world", "max_tokens": 2, "logprobs": 2});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["logprobs"],
        json!({"tokens": [" t1", " t3"], "token_logprobs": [-0.5, -0.5],
            "top_logprobs": [{" a1": -1.0, " a2": -2.0}, {" a1": -1.0, " a2": -2.0}],
            "text_offset": [0, 3]})
    );
    assert_eq!(server.backend.requests()[0].top_n_tokens, 2);
    let body = json!({"prompt": "hello world", "max_tokens": 1, "logprobs": 0});
    let (_, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(
        reply["choices"][0]["logprobs"],
        json!({"tokens": [" t1"], "token_logprobs": [-0.5], "top_logprobs": null, "text_offset": [0]})
    );
    assert_eq!(server.backend.requests()[1].top_n_tokens, 0);
    server.stop().await;
}

#[tokio::test]
async fn model_names_an_adapter_and_lorax_fields_are_accepted() {
    let server = server(FakeBackend::new(), None).await;
    let cases = [
        json!({"model": "org/lora", "prompt": "hello"}),
        json!({"model": "org/lora", "prompt": "hello", "adapter_id": "org/lora"}),
        json!({"model": "team/lora", "prompt": "hello", "adapter_source": "local"}),
        json!({"model": TEST_MODEL_ID, "prompt": "hello", "merged_adapters":
            {"ids": ["org/a", "org/b"], "weights": [0.5, 0.5], "merge_strategy": "ties", "density": 0.5}}),
    ];
    for body in &cases {
        let (status, reply) = post(&server, "/v1/completions", body).await;
        assert_eq!(status, 200, "{body}: {reply}");
        assert_eq!(reply["model"], body["model"]);
    }
    let adapters: Vec<_> = server
        .backend
        .requests()
        .into_iter()
        .map(|r| r.adapter)
        .collect();
    let single = |a: &AdapterSpec| match a {
        AdapterSpec::Single(r) => Some((r.id.clone(), r.source)),
        _ => None,
    };
    assert_eq!(
        single(&adapters[0]),
        Some(("org/lora".into(), AdapterSource::Hub))
    );
    assert_eq!(
        single(&adapters[1]),
        Some(("org/lora".into(), AdapterSource::Hub))
    );
    assert_eq!(
        single(&adapters[2]),
        Some(("team/lora".into(), AdapterSource::Local))
    );
    assert!(matches!(adapters[3], AdapterSpec::Merged(_)));
    server.stop().await;
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let server = server(FakeBackend::new(), None).await;
    let list: serde_json::Value = reqwest::get(server.url("/v1/models"))
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(
        list,
        json!({"object": "list", "data": [{"id": TEST_MODEL_ID, "object": "model", "created": 0, "owned_by": "medley"}]})
    );
    let one = reqwest::get(server.url(&format!("/v1/models/{TEST_MODEL_ID}")))
        .await
        .expect("request");
    assert_eq!(one.status(), 200);
    let missing = reqwest::get(server.url("/v1/models/org/other"))
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.expect("json");
    assert_eq!(body["error"]["code"], "model_not_found");
    server.stop().await;
}

#[tokio::test]
async fn usage_reports_the_prompt_tokens_taken_from_the_prefix_cache() {
    let server = server(FakeBackend::new().with_cached_tokens(2), None).await;
    // Two choices of one prompt: its tokens (and their cached part) count once.
    let body = json!({"prompt": "hello world", "max_tokens": 2, "n": 2});
    let (status, reply) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 2}})
    );
    let body = json!({"prompt": "hello world", "max_tokens": 2, "stream": true,
        "stream_options": {"include_usage": true}});
    let (status, data) = post_stream(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    let chunks = chunks(&data);
    let usage = &chunks.last().expect("a usage chunk")["usage"];
    assert_eq!(usage["prompt_tokens_details"], json!({"cached_tokens": 2}));
    server.stop().await;
}
