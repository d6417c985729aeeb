//! gRPC front tests over loopback with the generated tonic clients.

use std::time::Duration;

use futures::StreamExt;
use medley_proto::v1 as pb;
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::infer::testing::{FakeBackend, TestServer};

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(server.grpc_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

async fn client(server: &TestServer) -> GenerationServiceClient<tonic::transport::Channel> {
    GenerationServiceClient::connect(server.grpc_url())
        .await
        .expect("connect")
}

fn request(inputs: &str, parameters: pb::GenerateParameters) -> pb::GenerateRequest {
    pb::GenerateRequest {
        inputs: inputs.into(),
        parameters: Some(parameters),
    }
}

#[tokio::test]
async fn generate_returns_text_and_details() {
    let server = TestServer::start(FakeBackend::new()).await;
    let resp = client(&server)
        .await
        .generate(request(
            "hello world",
            pb::GenerateParameters {
                max_new_tokens: Some(3),
                details: true,
                decoder_input_details: true,
                return_k_alternatives: Some(1),
                seed: Some(9),
                do_sample: true,
                stop: vec!["never".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(resp.generated_text, " t1 t3 t4");
    let d = resp.details.expect("details");
    assert_eq!(d.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(
        (d.prompt_tokens, d.generated_tokens, d.seed),
        (3, 3, Some(9))
    );
    assert_eq!(d.prefill.len(), 3);
    assert_eq!(d.prefill[0].logprob, None);
    assert_eq!(
        d.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    assert_eq!(d.tokens[0].alternative_tokens.len(), 1);
    let r = &server.backend.requests()[0];
    assert_eq!(r.parameters.seed, 9);
    assert_eq!(
        r.stopping_parameters.stop_sequences,
        vec!["never".to_string()]
    );
    server.stop().await;
}

#[tokio::test]
async fn generate_stream_ends_with_the_full_text() {
    let server = TestServer::start(FakeBackend::new()).await;
    let mut stream = client(&server)
        .await
        .generate_stream(request(
            "hello world",
            pb::GenerateParameters {
                max_new_tokens: Some(3),
                details: true,
                return_full_text: true,
                ..Default::default()
            },
        ))
        .await
        .expect("stream")
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.next().await {
        messages.push(m.expect("message"));
    }
    assert_eq!(messages.len(), 3);
    assert!(
        messages[..2]
            .iter()
            .all(|m| m.generated_text.is_none() && m.details.is_none())
    );
    let last = &messages[2];
    assert_eq!(last.generated_text.as_deref(), Some("hello world t1 t3 t4"));
    assert_eq!(last.token.as_ref().map(|t| t.id), Some(4));
    let d = last.details.expect("details");
    assert_eq!((d.prompt_tokens, d.generated_tokens, d.seed), (3, 3, None));
    assert_eq!(d.cached_tokens, None, "the backend reported none");
    server.stop().await;
}

#[tokio::test]
async fn details_report_the_prompt_tokens_taken_from_the_prefix_cache() {
    let server = TestServer::start(FakeBackend::new().with_cached_tokens(2)).await;
    let params = pb::GenerateParameters {
        max_new_tokens: Some(2),
        details: true,
        ..Default::default()
    };
    let mut c = client(&server).await;
    let resp = c
        .generate(request("hello world", params.clone()))
        .await
        .expect("generate")
        .into_inner();
    let d = resp.details.expect("details");
    assert_eq!((d.prompt_tokens, d.cached_tokens), (3, Some(2)));
    let mut stream = c
        .generate_stream(request("hello world", params))
        .await
        .expect("stream")
        .into_inner();
    let mut last = None;
    while let Some(m) = stream.next().await {
        last = Some(m.expect("message"));
    }
    let d = last
        .and_then(|m| m.details)
        .expect("details on the last message");
    assert_eq!((d.prompt_tokens, d.cached_tokens), (3, Some(2)));
    server.stop().await;
}

#[tokio::test]
async fn validation_errors_are_invalid_argument_with_the_http_message() {
    let server = TestServer::start(FakeBackend::new()).await;
    let mut c = client(&server).await;
    let status = c
        .generate(request(
            "hi",
            pb::GenerateParameters {
                top_k: Some(0),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "Input validation error: `top_k` must be strictly positive. Given: 0"
    );
    let status = c
        .generate_stream(request("", pb::GenerateParameters::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "Input validation error: `inputs` cannot be empty"
    );
    // The adapter fields are validated like REST's (same messages).
    let status = c
        .generate(request(
            "hi",
            pb::GenerateParameters {
                merged_adapters: Some(pb::MergedAdapters {
                    ids: vec!["org/a".into(), "org/b".into()],
                    weights: vec![1.0],
                    merge_strategy: Some("ties".into()),
                    density: Some(0.5),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "Input validation error: `merged_adapters.weights` must have one weight per adapter id. Given: 2 ids and 1 weights"
    );
    assert!(server.backend.requests().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn generation_failures_map_to_grpc_codes() {
    let failing = FakeBackend::new().with_behavior(crate::infer::testing::Behavior::FailAfter(0));
    let server = TestServer::start(failing).await;
    let status = client(&server)
        .await
        .generate(request(
            "hi",
            pb::GenerateParameters {
                max_new_tokens: Some(2),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "Request failed during generation: fake shard failure"
    );
    server.stop().await;
}

#[tokio::test]
async fn info_reports_model_and_limits() {
    let server = TestServer::start(FakeBackend::new()).await;
    let info = client(&server)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_id, "test/tiny-model");
    assert_eq!((info.max_input_length, info.max_total_tokens), (32, 64));
    assert_eq!(
        (info.max_concurrent_requests, info.max_stop_sequences),
        (8, 4)
    );
    assert_eq!((info.max_new_tokens_default, info.world_size), (16, 1));
    assert_eq!(info.model_device_type, "cpu");
    server.stop().await;
}

#[tokio::test]
async fn cancelling_a_stream_cancels_the_backend_request() {
    let server = TestServer::start(FakeBackend::new().with_delay(Duration::from_millis(300))).await;
    let mut stream = client(&server)
        .await
        .generate_stream(request(
            "hello",
            pb::GenerateParameters {
                max_new_tokens: Some(60),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.expect("a message").expect("ok");
    assert_eq!(first.token.map(|t| t.id), Some(1));
    drop(stream);
    server.backend.wait_cancelled(1).await;
    // Noticed while waiting for the second token (RST_STREAM reaches the server at once).
    assert_eq!(server.backend.sent_before_cancel(), vec![1]);
    server.stop().await;
}

async fn health_status(server: &TestServer, service: &str) -> i32 {
    HealthClient::new(channel(server).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("check")
        .into_inner()
        .status
}

#[tokio::test]
async fn health_service_reports_the_backend() {
    let server = TestServer::start(FakeBackend::new()).await;
    for service in ["", "medley.v1.GenerationService"] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    server.stop().await;

    let unhealthy = FakeBackend::new();
    unhealthy.set_healthy(false);
    let server = TestServer::start(unhealthy).await;
    for service in ["", "medley.v1.GenerationService"] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::NotServing as i32,
            "{service:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let server = TestServer::start(FakeBackend::new()).await;
    let mut c = ServerReflectionClient::new(channel(&server).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = c
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.next().await.expect("a reply").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, crate::server::SERVED_SERVICES);
    server.stop().await;
}

#[tokio::test]
async fn named_merges_over_grpc() {
    use medley_proto::v1::merge_service_client::MergeServiceClient;
    let backend = FakeBackend::new();
    let server = TestServer::start(backend.clone()).await;
    let mut merges = MergeServiceClient::new(channel(&server).await);
    let spec = pb::MergedAdapters {
        ids: vec!["org/a".into(), "org/b".into()],
        weights: vec![1.0, 0.5],
        merge_strategy: Some("ties".into()),
        density: Some(0.5),
        ..Default::default()
    };
    let create = pb::CreateMergeRequest {
        name: "sql-ads".into(),
        merged_adapters: Some(spec.clone()),
        adapter_source: None,
    };
    let created = merges
        .create_merge(create.clone())
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.name, "sql-ads");
    assert_eq!(created.key.len(), 12);
    let again = merges.create_merge(create).await.expect_err("exists");
    assert_eq!(again.code(), Code::AlreadyExists);
    let bad = pb::CreateMergeRequest {
        name: "bad name".into(),
        merged_adapters: Some(spec.clone()),
        adapter_source: None,
    };
    let bad = merges.create_merge(bad).await.expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let listed = merges
        .list_merges(pb::ListMergesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.merges, vec![created.clone()]);

    // The name and the inline spec reach the backend as one merge.
    let mut gen_client = client(&server).await;
    for parameters in [
        pb::GenerateParameters {
            adapter_id: Some("sql-ads".into()),
            max_new_tokens: Some(2),
            ..Default::default()
        },
        pb::GenerateParameters {
            merged_adapters: Some(spec),
            max_new_tokens: Some(2),
            ..Default::default()
        },
    ] {
        gen_client
            .generate(request("hello world", parameters))
            .await
            .expect("generate");
    }
    let keys: Vec<_> = backend.requests().iter().map(|r| r.adapter.key()).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);

    let get = |name: &str| pb::GetMergeRequest { name: name.into() };
    assert_eq!(
        merges
            .get_merge(get("sql-ads"))
            .await
            .expect("get")
            .into_inner(),
        created
    );
    let deleted = merges
        .delete_merge(pb::DeleteMergeRequest {
            name: "sql-ads".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.name, "sql-ads");
    let missing = merges.get_merge(get("sql-ads")).await.expect_err("gone");
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}
