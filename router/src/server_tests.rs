//! Server tests: both fronts on loopback over a fake backend, TLS included.

use super::*;
use crate::infer::testing::{FakeBackend, test_config, test_limits, word_tokenizer};

fn backend() -> Arc<dyn Backend> {
    Arc::new(FakeBackend::new())
}

#[tokio::test]
async fn startup_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let missing = test_config(test_limits(), dir.path().join("missing.json"));
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken = http.local_addr().unwrap();
    assert!(matches!(
        Server::from_listeners(missing, backend(), http, grpc),
        Err(ServerError::Tokenizer { .. })
    ));

    let path = dir.path().join("tokenizer.json");
    word_tokenizer().save(&path, false).unwrap();
    let _holder = TcpListener::bind(taken).await.unwrap();
    let mut config = test_config(test_limits(), path);
    config.http_addr = taken;
    match run(config, backend(), std::future::ready(())).await {
        Err(ServerError::Bind { addr, .. }) => assert_eq!(addr, taken),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[tokio::test]
async fn run_with_listeners_serves_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    word_tokenizer().save(&path, false).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with_listeners(
        test_config(test_limits(), path),
        backend(),
        http,
        grpc,
        async move {
            let _ = stopped.await;
        },
    ));
    let resp = reqwest::get(format!("http://{http_addr}/health"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(
        reqwest::get(format!("http://{http_addr}/health"))
            .await
            .is_err(),
        "the listener is closed after shutdown"
    );
}

/// The parts of a `google.protobuf.FileDescriptorProto` the reflection test looks at.
#[derive(Clone, PartialEq, prost::Message)]
struct FileDescriptorHead {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptorHead>,
}

/// The name of a `google.protobuf.ServiceDescriptorProto`.
#[derive(Clone, PartialEq, prost::Message)]
struct ServiceDescriptorHead {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// Clients that speak only reflection v1alpha (`grpcio-reflection`, older grpcurl) see the
/// same services and descriptors as v1 clients.
#[tokio::test]
async fn reflection_v1alpha_lists_and_describes_the_services() {
    use futures::StreamExt;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    use crate::infer::testing::TestServer;

    let server = TestServer::start(FakeBackend::new()).await;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut c = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("medley.v1.GenerationService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut replies = c
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .expect("reflection v1alpha")
        .into_inner();

    let reply = replies.next().await.expect("a reply").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, SERVED_SERVICES);

    let reply = replies.next().await.expect("a reply").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let [file] = files.file_descriptor_proto.as_slice() else {
        panic!(
            "expected one descriptor, got {}",
            files.file_descriptor_proto.len()
        );
    };
    let file = <FileDescriptorHead as prost::Message>::decode(file.as_slice())
        .expect("a FileDescriptorProto");
    assert_eq!(file.package.as_deref(), Some("medley.v1"));
    assert!(
        file.service
            .iter()
            .any(|s| s.name.as_deref() == Some("GenerationService")),
        "{file:?}"
    );
    drop(replies);
    server.stop().await;
}

/// A TLS test server on a fresh self-signed certificate: the server, the certificate PEM.
async fn tls_server(
    backend: FakeBackend,
) -> (crate::infer::testing::TestServer, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::tls::testing::self_signed();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let tls = crate::tls::TlsConfig::from_files(&cert_file, &key_file).unwrap();
    let server =
        crate::infer::testing::TestServer::start_configured(backend, test_limits(), &[], |c| {
            c.tls = Some(tls)
        })
        .await;
    (server, cert, dir)
}

fn https_client(cert: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .build()
        .unwrap()
}

async fn grpcs_client(
    addr: SocketAddr,
    cert: &str,
) -> medley_proto::v1::generation_service_client::GenerationServiceClient<tonic::transport::Channel>
{
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    medley_proto::v1::generation_service_client::GenerationServiceClient::new(channel)
}

/// With a certificate both ports speak TLS only: HTTPS and gRPC over TLS work for a client
/// trusting it; plaintext, or TLS to a client that does not trust it, fails without taking
/// the listeners down.
#[tokio::test]
async fn tls_serves_https_and_grpcs_only() {
    use medley_proto::v1 as pb;

    let (server, cert, _dir) = tls_server(FakeBackend::new()).await;
    let https = https_client(&cert);
    let base = format!("https://127.0.0.1:{}", server.http.port());
    let health = https.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let generate = |https: reqwest::Client| {
        let url = format!("{base}/generate");
        async move {
            https
                .post(url)
                .json(&serde_json::json!({"inputs": "hello world",
                    "parameters": {"max_new_tokens": 3}}))
                .send()
                .await
                .unwrap()
        }
    };
    let r = generate(https.clone()).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["generated_text"], " t1 t3 t4");

    let mut grpc = grpcs_client(server.grpc, &cert).await;
    let info = grpc
        .info(pb::InfoRequest {})
        .await
        .expect("Info")
        .into_inner();
    assert_eq!(info.model_id, crate::infer::testing::TEST_MODEL_ID);
    let reply = grpc
        .generate(pb::GenerateRequest {
            inputs: "hello world".into(),
            parameters: Some(pb::GenerateParameters {
                max_new_tokens: Some(3),
                ..Default::default()
            }),
        })
        .await
        .expect("Generate")
        .into_inner();
    assert_eq!(reply.generated_text, " t1 t3 t4");

    // No plaintext fallback on either port, and no trust without the certificate.
    let plain = reqwest::get(format!("http://{}/health", server.http)).await;
    assert!(plain.is_err(), "plaintext HTTP answered: {plain:?}");
    let untrusted = reqwest::get(format!("{base}/health")).await;
    assert!(untrusted.is_err(), "an untrusting client connected");
    let plain_grpc = async {
        let mut c = medley_proto::v1::generation_service_client::GenerationServiceClient::connect(
            format!("http://{}", server.grpc),
        )
        .await?;
        c.info(pb::InfoRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let plain_grpc = tokio::time::timeout(Duration::from_secs(10), plain_grpc)
        .await
        .expect("a plaintext gRPC call fails fast");
    assert!(plain_grpc.is_err(), "plaintext gRPC answered");

    // The failed handshakes did not stop either listener.
    assert_eq!(generate(https_client(&cert)).await.status(), 200);
    let mut grpc = grpcs_client(server.grpc, &cert).await;
    grpc.info(pb::InfoRequest {})
        .await
        .expect("Info after failed handshakes");
    server.stop().await;
}

/// Stopping a TLS server lets an in-flight HTTPS request finish.
#[tokio::test]
async fn tls_shutdown_is_graceful() {
    let backend = FakeBackend::new().with_delay(Duration::from_millis(100));
    let (server, cert, _dir) = tls_server(backend.clone()).await;
    let url = format!("https://127.0.0.1:{}/generate", server.http.port());
    let request = tokio::spawn(
        https_client(&cert)
            .post(url)
            .json(&serde_json::json!({"inputs": "hello world",
                "parameters": {"max_new_tokens": 5}}))
            .send(),
    );
    while backend.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
    let r = request
        .await
        .unwrap()
        .expect("the in-flight request finishes");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["generated_text"], " t1 t3 t4 t1 t3");
}
