//! `medley serve --tls-cert-file --tls-key-file` end to end: the real binary serves HTTPS and
//! gRPC over TLS with a self-signed certificate, and plaintext on neither port.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::{Server, ServerOptions, TlsPem, tiny_model_dir};
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_proto::v1::{GenerateParameters, GenerateRequest, InfoRequest};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_tls_answers_https_and_grpc_over_tls() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    // The harness waits for readiness over HTTPS, trusting the certificate.
    let s = Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        tls: Some(TlsPem {
            cert: cert.cert.pem(),
            key: cert.signing_key.serialize_pem(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(s.http.starts_with("https://"), "{}", s.http);

    let http = s
        .post(
            "/generate",
            &json!({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 6}}),
        )
        .await
        .unwrap();
    assert_eq!(http.status, 200, "{}", http.body);
    let text = http.body["generated_text"].as_str().unwrap().to_string();

    let mut grpc = GenerationServiceClient::new(s.grpc_channel().await.unwrap());
    let info = grpc.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_dtype, "float32");
    let reply = grpc
        .generate(GenerateRequest {
            inputs: "The quick brown fox".into(),
            parameters: Some(GenerateParameters {
                max_new_tokens: Some(6),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.generated_text, text,
        "greedy: the same text on both ports"
    );

    // No plaintext on either port.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/health", s.port)).await;
    assert!(plain.is_err(), "plaintext HTTP answered: {plain:?}");
    let plain_grpc = async {
        let url = s.grpc.replacen("https://", "http://", 1);
        GenerationServiceClient::connect(url)
            .await?
            .info(InfoRequest {})
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    assert!(plain_grpc.await.is_err(), "plaintext gRPC answered");
    // ... and the refused handshakes left the server serving.
    assert_eq!(s.get("/health").await.unwrap().0, 200);
}
