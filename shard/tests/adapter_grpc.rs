//! The adapter RPCs end to end in one process: the engine thread and the gRPC server on a temp
//! Unix socket with the tiny model, a tonic client. Loading an adapter changes generation;
//! decode steps keep running while a merge is in progress; slot errors carry the right codes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use medley_hub::HubSettings;
use medley_proto::shard::v1 as pb;
use medley_proto::shard::v1::shard_service_client::ShardServiceClient;
use medley_shard::adapters::{
    AdapterLoader, AdapterSettings, AdapterStore, BaseModules, LoraBackend,
};
use medley_shard::engine::{Engine, EngineHandle, EngineInfo, TextContext};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{LlamaModel, LoadOptions};
use medley_shard::server::{ShardServer, serve_uds};
use tonic::transport::{Channel, Endpoint, Uri};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Releases merges held by the loader's hook, and reports when one started.
struct Gate {
    started: Mutex<mpsc::Receiver<()>>,
    release: Mutex<mpsc::Sender<()>>,
}

struct Shard {
    client: ShardServiceClient<Channel>,
    gate: Arc<Gate>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the tiny model with 3 slots, adapters from the committed fixtures, and a merge hook
/// that waits for [`Gate::release`] (single adapters are not held).
async fn start() -> Shard {
    let model_dir = fixtures().join("tiny-llama");
    let model = LlamaModel::load(&model_dir, &LoadOptions::default()).unwrap();
    let cfg = model.config().clone();
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let kv = KvCache::new(
        &cfg,
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(4096),
    )
    .unwrap();
    let mut settings = AdapterSettings::new(HubSettings::from_vars(None, |_| None));
    settings.roots = vec![fixtures().join("adapters")];
    settings.max_slots = 3;
    settings.merge_threads = 1;
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let loader = AdapterLoader::new(&settings, BaseModules::from_config(&cfg), model.device())
        .unwrap()
        .with_before_merge(Arc::new(move || {
            started_tx.lock().unwrap().send(()).unwrap();
            release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60))
                .unwrap();
        }));
    let store = AdapterStore::new(
        settings.max_slots,
        settings.memory_budget,
        LoraBackend::Kernels,
    );
    let info = EngineInfo {
        model_id: "tiny".into(),
        rank: 0,
        world_size: 1,
        device_ranks: 1,
    };
    let engine = Engine::new(
        model,
        kv,
        TextContext::new(tokenizer, cfg.eos_token_ids.clone()),
        info,
        store,
    );
    let (handle, _join) = EngineHandle::spawn(engine).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shard.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = ShardServer::new(handle, Arc::new(loader));
    let path = socket.clone();
    tokio::spawn(async move {
        serve_uds(server, &path, async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    let mut client = None;
    for _ in 0..100 {
        let socket = socket.clone();
        let connected = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await;
        if let Ok(ch) = connected {
            client = Some(ShardServiceClient::new(ch));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Shard {
        client: client.expect("shard did not start"),
        gate: Arc::new(Gate {
            started: Mutex::new(started_rx),
            release: Mutex::new(release_tx),
        }),
        _dir: dir,
        stop: Some(stop_tx),
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn local(id: &str) -> pb::AdapterRef {
    pb::AdapterRef {
        id: id.into(),
        source: pb::AdapterSource::Local as i32,
        revision: None,
        api_token: None,
    }
}

/// What to load into which slot.
struct LoadRequest {
    slot: u32,
    spec: Option<pb::AdapterSpec>,
}

/// What a load (prepare, then install) reported.
#[derive(Debug)]
struct Loaded {
    bytes: u64,
    rank: u32,
    content_hash: String,
    merge_ns: u64,
}

/// Prepares `req.spec` under a fresh staging id and installs it into `req.slot`, as the router
/// does.
async fn load(
    c: &mut ShardServiceClient<Channel>,
    req: LoadRequest,
) -> Result<Loaded, tonic::Status> {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prepared = c
        .prepare_adapter(pb::PrepareAdapterRequest { id, spec: req.spec })
        .await?
        .into_inner();
    let installed = c
        .install_adapter(pb::InstallAdapterRequest { id, slot: req.slot })
        .await?
        .into_inner();
    assert_eq!(installed.bytes, prepared.bytes);
    assert_eq!(installed.content_hash, prepared.content_hash);
    Ok(Loaded {
        bytes: prepared.bytes,
        rank: prepared.rank,
        content_hash: prepared.content_hash,
        merge_ns: prepared.merge_ns,
    })
}

fn single(slot: u32, id: &str) -> LoadRequest {
    LoadRequest {
        slot,
        spec: Some(pb::AdapterSpec {
            kind: Some(pb::adapter_spec::Kind::Single(local(id))),
        }),
    }
}

fn ties(slot: u32) -> LoadRequest {
    let ids = ["strong_a_r8", "strong_b_r8_attn", "strong_c_r8_rslora"];
    LoadRequest {
        slot,
        spec: Some(pb::AdapterSpec {
            kind: Some(pb::adapter_spec::Kind::Merged(pb::MergeParameters {
                components: ids
                    .iter()
                    .zip([1.0, 0.6, -0.3])
                    .map(|(id, w)| pb::MergeComponent {
                        adapter: Some(local(id)),
                        weight: w,
                    })
                    .collect(),
                strategy: "ties".into(),
                density: Some(0.5),
                majority_sign_method: "total".into(),
                seed: 0,
                svd_rank: None,
                semantics: "peft".into(),
                svd_clamp: None,
            })),
        }),
    }
}

/// A greedy request for 8 new tokens that ignores EOS.
fn request(id: u64, slot: u32) -> pb::Request {
    pb::Request {
        id,
        input_ids: vec![1, 282, 223, 313, 75, 69, 77, 271],
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: 1.0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: 8,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        prefill_logprobs: false,
        top_n_tokens: 0,
        adapter_slot: slot,
        traceparent: None,
    }
}

fn batch(id: u64, requests: Vec<pb::Request>) -> pb::PrefillRequest {
    pb::PrefillRequest {
        batch: Some(pb::Batch {
            id,
            size: requests.len() as u32,
            max_tokens: 16 * requests.len() as u32,
            requests,
        }),
        running: vec![],
    }
}

/// Prefills `requests` as batch `id` and decodes until every request finished; returns each
/// request's tokens by request id.
async fn generate(
    client: &mut ShardServiceClient<Channel>,
    id: u64,
    requests: Vec<pb::Request>,
) -> std::collections::BTreeMap<u64, Vec<u32>> {
    let mut out = std::collections::BTreeMap::<u64, Vec<u32>>::new();
    let mut record = |gens: &[pb::Generation]| {
        for g in gens {
            out.entry(g.request_id)
                .or_default()
                .extend(&g.tokens.as_ref().unwrap().ids);
        }
    };
    let resp = client
        .prefill(batch(id, requests))
        .await
        .unwrap()
        .into_inner();
    record(&resp.generations);
    let mut cached = resp.batch;
    while let Some(b) = cached {
        let resp = client
            .decode(pb::DecodeRequest { batches: vec![b] })
            .await
            .unwrap()
            .into_inner();
        record(&resp.generations);
        cached = resp.batch;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_adapter_changes_generation_and_slots_are_accounted() {
    let mut shard = start().await;
    let c = &mut shard.client;
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.max_adapter_slots, 3);
    assert_eq!(info.adapter_memory_bytes, 1 << 30);

    let loaded = load(c, single(1, "strong_a_r8")).await.unwrap();
    assert_eq!(loaded.rank, 8);
    assert!(loaded.bytes > 0 && loaded.merge_ns == 0);
    assert_eq!(loaded.content_hash.len(), 64);
    let listed = c
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .slots;
    assert_eq!(
        listed,
        vec![pb::AdapterSlot {
            slot: 1,
            content_hash: loaded.content_hash.clone(),
            bytes: loaded.bytes,
        }]
    );

    // Base and adapter rows in one batch: same prompt, different continuations.
    let out = generate(c, 1, vec![request(10, 0), request(11, 1)]).await;
    assert_eq!(out[&10].len(), 8);
    assert_eq!(out[&11].len(), 8);
    assert_ne!(out[&10], out[&11], "the adapter must change greedy tokens");
    // Deterministic: the adapter alone gives the same tokens.
    let again = generate(c, 2, vec![request(12, 1)]).await;
    assert_eq!(again[&12], out[&11]);

    // An empty slot, a slot out of range, a missing adapter.
    let e = c.prefill(batch(3, vec![request(13, 2)])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("slot 2 is empty"), "{e}");
    let e = load(c, single(0, "strong_a_r8")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = load(c, single(4, "strong_a_r8")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = load(c, single(2, "no_such_adapter")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains("no_such_adapter"), "{e}");
    let e = load(c, single(2, "../tiny-llama")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // Installs take a prepared adapter: an unknown or discarded staging id is NOT_FOUND.
    let install = |id| pb::InstallAdapterRequest { id, slot: 2 };
    let e = c.install_adapter(install(999_999)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let spec = single(2, "strong_a_r8").spec;
    c.prepare_adapter(pb::PrepareAdapterRequest { id: 777_777, spec })
        .await
        .unwrap();
    c.discard_adapter(pb::DiscardAdapterRequest { id: Some(777_777) })
        .await
        .unwrap();
    let e = c.install_adapter(install(777_777)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // A slot used by a cached batch can be neither offloaded nor replaced.
    let resp = c
        .prefill(batch(4, vec![request(14, 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.batch.is_some());
    let e = c
        .offload_adapter(pb::OffloadAdapterRequest { slot: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = load(c, single(1, "strong_b_r8_attn")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    c.clear_cache(pb::ClearCacheRequest { id: Some(4) })
        .await
        .unwrap();
    // Now both work; replacing reports the new adapter.
    let replaced = load(c, single(1, "strong_b_r8_attn")).await.unwrap();
    assert_ne!(replaced.content_hash, loaded.content_hash);
    c.offload_adapter(pb::OffloadAdapterRequest { slot: 1 })
        .await
        .unwrap();
    let listed = c
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.slots.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_keeps_running_while_a_merge_is_in_progress() {
    let shard = start().await;
    let mut c = shard.client.clone();
    load(&mut c, single(1, "strong_a_r8")).await.unwrap();
    let resp = c
        .prefill(batch(1, vec![request(1, 1), request(2, 0)]))
        .await
        .unwrap()
        .into_inner();
    let mut cached = resp.batch;

    // Start a merge into slot 2; the hook holds it until released.
    let mut merging_client = c.clone();
    let merge = tokio::spawn(async move { load(&mut merging_client, ties(2)).await });
    let gate = shard.gate.clone();
    tokio::task::spawn_blocking(move || {
        gate.started
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
    })
    .await
    .unwrap();

    // The merge is in progress: decode steps, a prefill and even another load still complete.
    let mut steps = 0;
    while let Some(b) = cached {
        let resp = tokio::time::timeout(
            Duration::from_secs(20),
            c.decode(pb::DecodeRequest { batches: vec![b] }),
        )
        .await
        .expect("decode blocked by the merge")
        .unwrap()
        .into_inner();
        cached = resp.batch;
        steps += 1;
    }
    assert_eq!(steps, 7, "8 tokens: 1 at prefill, 7 decode steps");
    let other = tokio::time::timeout(
        Duration::from_secs(20),
        generate(&mut c, 2, vec![request(3, 1)]),
    )
    .await
    .expect("prefill blocked by the merge");
    assert_eq!(other[&3].len(), 8);
    tokio::time::timeout(
        Duration::from_secs(20),
        load(&mut c, single(3, "strong_c_r8_rslora")),
    )
    .await
    .expect("single load blocked by the merge")
    .unwrap();
    assert!(!merge.is_finished(), "the merge must still be held");
    let listed = c
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.slots.iter().all(|s| s.slot != 2),
        "slot 2 is installed only when done"
    );

    shard.gate.release.lock().unwrap().send(()).unwrap();
    let merged = merge.await.unwrap().unwrap();
    assert!(merged.merge_ns > 0);
    assert_eq!(merged.rank, 8);
    let out = generate(&mut c, 3, vec![request(4, 2), request(5, 0)]).await;
    assert_ne!(out[&4], out[&5]);
}
