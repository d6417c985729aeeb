//! One merge spec on every entry point, end to end: a merge sent over HTTP reaches the shard
//! unchanged (the shard computes the same weights as for the spec built directly), and an
//! invalid merge is refused with the same message by the HTTP API, the gRPC API, `medley merge`
//! and the shard itself.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::Command;

use medley_e2e::{Server, binaries, fixture_adapters};
use medley_proto::shard::v1 as shard_pb;
use medley_proto::shard::v1::shard_service_client::ShardServiceClient;
use medley_proto::v1 as public_pb;
use medley_proto::v1::generation_service_client::GenerationServiceClient;
use medley_spec::{
    AdapterRef, AdapterSource, AdapterSpec, MergeSpec, MergedAdapterSpec, ParseNameError,
    SignMethod, SpecError, Strategy,
};
use serde_json::json;
use tonic::transport::Channel;

const ADAPTERS: [&str; 2] = ["strong_a_r8", "strong_b_r8_attn"];

async fn server() -> Server {
    Server::with_adapter_root(&fixture_adapters())
        .await
        .unwrap()
}

/// A client of rank 0's internal socket (what the router talks to).
async fn shard_client(server: &Server) -> ShardServiceClient<Channel> {
    let channel = medley_router::backend::client::connect_uds(&server.shard_socket(0))
        .await
        .unwrap();
    ShardServiceClient::new(channel)
}

fn local(id: &str) -> AdapterRef {
    AdapterRef {
        id: id.into(),
        source: AdapterSource::Local,
        revision: None,
        api_token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_reaches_the_shard_unchanged() {
    let s = server().await;
    // Every field that shapes the weights: strategy, weights, density, sign method, seed,
    // SVD rank and clamp.
    let merged = json!({
        "ids": ADAPTERS, "weights": [1.5, -0.5], "merge_strategy": "DARE_TIES_SVD",
        "density": 0.6, "majority_sign_method": "frequency", "seed": 11, "svd_rank": 4,
        "svd_clamp": 0.9,
    });
    let body = json!({"inputs": "Hello there", "parameters": {
        "max_new_tokens": 2, "adapter_source": "local", "merged_adapters": merged}});
    let r = s.post("/generate", &body).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // The weights the shard holds for it, by content hash...
    let mut shard = shard_client(&s).await;
    let slots = shard
        .list_adapters(shard_pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .slots;
    assert_eq!(slots.len(), 1, "{slots:?}");
    // ...equal those of the same spec built here and sent straight to the shard.
    let spec = AdapterSpec::Merged(MergedAdapterSpec {
        components: ADAPTERS.iter().map(|id| local(id)).collect(),
        merge: MergeSpec::new(Strategy::DareTiesSvd, vec![1.5, -0.5])
            .with_density(0.6)
            .with_sign_method(SignMethod::Frequency)
            .with_seed(11)
            .with_svd_rank(4)
            .with_svd_clamp(0.9),
    });
    let id = u64::MAX - 1;
    let direct = shard
        .prepare_adapter(shard_pb::PrepareAdapterRequest {
            id,
            spec: medley_spec::wire::spec_to_proto(&spec),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(slots[0].content_hash, direct.content_hash);
    assert_eq!(direct.rank, 4, "svd_rank reached the shard");
    // Without the clamp the weights differ: the hash does see every field.
    let AdapterSpec::Merged(mut unclamped) = spec else {
        unreachable!()
    };
    unclamped.merge.svd_clamp = None;
    let other = shard
        .prepare_adapter(shard_pb::PrepareAdapterRequest {
            id: id - 1,
            spec: medley_spec::wire::spec_to_proto(&AdapterSpec::Merged(unclamped)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.content_hash, direct.content_hash);
    shard
        .discard_adapter(shard_pb::DiscardAdapterRequest { id: None })
        .await
        .unwrap();
}

/// An invalid merge as each entry point writes it.
struct Case {
    /// The `merged_adapters` fields besides ids and weights (HTTP and gRPC).
    json: serde_json::Value,
    /// The `medley merge` flags besides --adapters, --weights and --out.
    flags: Vec<&'static str>,
    /// The shard's wire form.
    wire: fn(&mut shard_pb::MergeParameters),
    /// What every entry point says.
    error: SpecError,
}

fn cases() -> Vec<Case> {
    let unknown = |kind: &'static str, given: &str, valid: &str| ParseNameError {
        kind,
        given: given.into(),
        valid: valid.into(),
    };
    let strategies = Strategy::ALL.map(Strategy::name).join(", ");
    vec![
        Case {
            json: json!({"merge_strategy": "slerp"}),
            flags: vec!["--strategy", "slerp"],
            wire: |m| m.strategy = "slerp".into(),
            error: SpecError::UnknownName {
                field: "merge_strategy",
                error: unknown("merge strategy", "slerp", &strategies),
            },
        },
        Case {
            json: json!({"merge_strategy": "ties", "majority_sign_method": "majority", "density": 0.5}),
            flags: vec![
                "--strategy",
                "ties",
                "--density",
                "0.5",
                "--majority-sign-method",
                "majority",
            ],
            wire: |m| m.majority_sign_method = "majority".into(),
            error: SpecError::UnknownName {
                field: "majority_sign_method",
                error: unknown("majority sign method", "majority", "total, frequency"),
            },
        },
        Case {
            json: json!({"merge_strategy": "ties"}),
            flags: vec!["--strategy", "ties"],
            wire: |m| m.density = None,
            error: SpecError::MissingDensity { strategy: "ties" },
        },
        Case {
            json: json!({"merge_strategy": "ties", "density": 1.5}),
            flags: vec!["--strategy", "ties", "--density", "1.5"],
            wire: |m| m.density = Some(1.5),
            error: SpecError::DensityRange(1.5),
        },
        Case {
            json: json!({"merge_strategy": "svd", "svd_rank": 0}),
            flags: vec!["--strategy", "svd", "--svd-rank", "0"],
            wire: |m| {
                m.strategy = "svd".into();
                m.svd_rank = Some(0);
            },
            error: SpecError::SvdRank,
        },
        Case {
            json: json!({"merge_strategy": "svd", "svd_clamp": 1.5}),
            flags: vec!["--strategy", "svd", "--svd-clamp", "1.5"],
            wire: |m| {
                m.strategy = "svd".into();
                m.svd_clamp = Some(1.5);
            },
            error: SpecError::SvdClampRange(1.5),
        },
    ]
}

/// A valid wire merge (ties at density 0.5) for the shard cases to break.
fn valid_wire() -> shard_pb::MergeParameters {
    let spec = AdapterSpec::Merged(MergedAdapterSpec {
        components: ADAPTERS.iter().map(|id| local(id)).collect(),
        merge: MergeSpec::new(Strategy::Ties, vec![1.0, 0.5]).with_density(0.5),
    });
    match medley_spec::wire::spec_to_proto(&spec).and_then(|s| s.kind) {
        Some(shard_pb::adapter_spec::Kind::Merged(m)) => m,
        other => panic!("{other:?}"),
    }
}

fn run_medley_merge(flags: &[&str], out: &Path) -> String {
    let adapters: Vec<String> = ADAPTERS
        .iter()
        .map(|a| fixture_adapters().join(a).display().to_string())
        .collect();
    let output = Command::new(binaries().unwrap().join("medley"))
        .arg("merge")
        .arg("--adapters")
        .arg(adapters.join(","))
        .args(["--weights", "1.0,0.5"])
        .args(flags)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{flags:?}: a usage error");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_merge_gets_the_same_message_everywhere() {
    let s = server().await;
    let mut grpc = GenerationServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let mut shard = shard_client(&s).await;
    let out = tempfile::tempdir().unwrap();
    for case in cases() {
        let message = case.error.to_string();
        let expected = format!("Input validation error: {message}");

        // HTTP (LoRAX REST).
        let mut merged = json!({"ids": ADAPTERS, "weights": [1.0, 0.5]});
        for (k, v) in case.json.as_object().unwrap() {
            merged[k] = v.clone();
        }
        let body = json!({"inputs": "Hi", "parameters": {
            "max_new_tokens": 2, "adapter_source": "local", "merged_adapters": merged}});
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, 422, "{message}: {}", r.body);
        assert_eq!(r.body["error"], expected.as_str());

        // gRPC (medley.v1).
        let m = &case.json;
        let request = public_pb::GenerateRequest {
            inputs: "Hi".into(),
            parameters: Some(public_pb::GenerateParameters {
                max_new_tokens: Some(2),
                adapter_source: Some("local".into()),
                merged_adapters: Some(public_pb::MergedAdapters {
                    ids: ADAPTERS.map(String::from).to_vec(),
                    weights: vec![1.0, 0.5],
                    merge_strategy: m["merge_strategy"].as_str().map(String::from),
                    density: m["density"].as_f64().map(|d| d as f32),
                    majority_sign_method: m["majority_sign_method"].as_str().map(String::from),
                    seed: None,
                    svd_rank: m["svd_rank"].as_u64().map(|r| r as u32),
                    svd_clamp: m["svd_clamp"].as_f64().map(|q| q as f32),
                }),
                ..Default::default()
            }),
        };
        let e = grpc.generate(request).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{message}");
        assert_eq!(e.message(), expected);

        // `medley merge`.
        let stderr = run_medley_merge(&case.flags, &out.path().join("merged"));
        assert!(stderr.contains(&message), "{message}\nstderr: {stderr}");

        // The shard, sent the invalid wire form directly.
        let mut wire = valid_wire();
        (case.wire)(&mut wire);
        let e = shard
            .prepare_adapter(shard_pb::PrepareAdapterRequest {
                id: 1 << 40,
                spec: Some(shard_pb::AdapterSpec {
                    kind: Some(shard_pb::adapter_spec::Kind::Merged(wire)),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{message}");
        assert_eq!(e.message(), message);
    }
    assert!(!out.path().join("merged").exists());
}
