//! Running a shard: joining its tensor-parallel group, loading the model, the KV cache and the
//! adapter slots, and serving the engine on its Unix socket until a signal stops it.

use std::sync::Arc;

use anyhow::Context;

use super::{DEFAULT_KV_CACHE_BYTES, PROVISIONAL_KV_TOKENS, ShardArgs, Switch, parse_dtype};
use crate::adapters::{AdapterLoader, AdapterStore, BaseModules};
use crate::comm::{Comm, CommBackend, ShmComm, ShmCommConfig, Single};
use crate::device::DeviceSpec;
use crate::engine::{
    Engine, EngineHandle, EngineInfo, EngineThreadSettings, KvSizing, TextContext,
};
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::model::{LlamaModel, LoadOptions, TpLayout};

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutdown signal received");
}

/// The collectives of this rank: none at world size 1 (unless NCCL is asked for), NCCL with the
/// group's `--nccl-id`, or the shared-memory group at `--comm-path` (each waits until every
/// rank has joined).
fn join_group(
    args: &ShardArgs,
    tp: TpLayout,
    device: &candle_core::Device,
) -> anyhow::Result<Arc<dyn Comm>> {
    let backend = args
        .comm
        .resolve(args.device, tp.world as u32)
        .map_err(anyhow::Error::msg)?;
    let t0 = std::time::Instant::now();
    let comm: Arc<dyn Comm> = match backend {
        CommBackend::Single => return Ok(Arc::new(Single)),
        CommBackend::Nccl => join_nccl(args, tp, device)?,
        CommBackend::Shm => {
            let path = args.comm_path.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "--comm-path (MEDLEY_COMM_PATH) is required with a world size of {}",
                    tp.world
                )
            })?;
            let mut cfg = ShmCommConfig::new(path, tp.rank, tp.world);
            cfg.timeout = std::time::Duration::from_secs(args.comm_timeout.max(1));
            Arc::new(ShmComm::join(&cfg).context("joining the tensor-parallel group")?)
        }
    };
    tracing::info!(
        rank = tp.rank,
        world = tp.world,
        backend = ?backend,
        join_ms = t0.elapsed().as_millis() as u64,
        "joined the tensor-parallel group"
    );
    Ok(comm)
}

#[cfg(feature = "cuda")]
fn join_nccl(
    args: &ShardArgs,
    tp: TpLayout,
    device: &candle_core::Device,
) -> anyhow::Result<Arc<dyn Comm>> {
    use crate::comm::backend::nccl_id_from_hex;
    use crate::comm::nccl::{NcclComm, new_unique_id};
    let id = match &args.nccl_id {
        Some(text) => nccl_id_from_hex(text).map_err(anyhow::Error::msg)?,
        None if tp.world == 1 => new_unique_id()?,
        None => anyhow::bail!(
            "--nccl-id (MEDLEY_NCCL_ID) is required for NCCL with a world size of {}",
            tp.world
        ),
    };
    let comm = NcclComm::join(device, tp.rank, tp.world, &id)
        .context("joining the NCCL tensor-parallel group")?;
    Ok(Arc::new(comm))
}

#[cfg(not(feature = "cuda"))]
fn join_nccl(_: &ShardArgs, _: TpLayout, _: &candle_core::Device) -> anyhow::Result<Arc<dyn Comm>> {
    anyhow::bail!("NCCL needs a binary built with the `cuda` feature")
}

/// Loads the model and serves it on `args.uds_path` until SIGTERM/SIGINT.
pub fn run(args: ShardArgs) -> anyhow::Result<()> {
    crate::engine::keep_freed_memory();
    let tp = TpLayout::new(args.rank as usize, args.world_size as usize)?;
    let device = args.device.open(args.rank)?;
    tracing::info!(device = %args.device, location = ?device.location(), "device opened");
    let comm = join_group(&args, tp, &device)?;
    let opts = LoadOptions {
        dtype: parse_dtype(&args.dtype)?,
        device: device.clone(),
        tp,
        comm,
        quantize: args.quantize,
        stack_projections: args.stack_projections,
    };
    let t0 = std::time::Instant::now();
    let model = LlamaModel::load(&args.model_dir, &opts)
        .with_context(|| format!("loading model from {}", args.model_dir.display()))?;
    let cfg = model.config().clone();
    let tokenizer = tokenizers::Tokenizer::from_file(args.model_dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("loading tokenizer.json: {e}"))?;
    let sizing = args.kv_sizing(device.is_cuda());
    let bytes_per_token = KvCache::bytes_per_token(model.kv_config(), model.dtype()).max(1);
    let capacity = match (args.kv_cache_tokens, args.kv_cache_bytes, sizing) {
        (Some(tokens), _, _) => tokens,
        (None, Some(bytes), _) => bytes / bytes_per_token,
        (None, None, KvSizing::GpuMemory { .. }) => PROVISIONAL_KV_TOKENS,
        (None, None, KvSizing::Fixed) => DEFAULT_KV_CACHE_BYTES / bytes_per_token,
    };
    let kv = KvCache::new(
        model.kv_config(),
        model.dtype(),
        &device,
        KvCacheConfig {
            capacity_tokens: capacity,
            block_tokens: args.kv_block_size as usize,
            prefix_caching: args.prefix_caching == Switch::On,
        },
    )
    .context("allocating the kv cache")?;
    // The engine thread computes on its own CUDA stream: finish this thread's uploads first.
    device
        .synchronize()
        .context("waiting for the model upload")?;
    tracing::info!(
        model = %args.model_dir.display(),
        dtype = ?model.dtype(),
        kv_cache_tokens = kv.capacity_tokens(),
        kv_sizing = ?sizing,
        kv_block_size = args.kv_block_size,
        prefix_caching = kv.prefix_caching(),
        threads = rayon::current_num_threads(),
        load_ms = t0.elapsed().as_millis() as u64,
        "model loaded"
    );
    let info = EngineInfo {
        model_id: args
            .model_id
            .clone()
            .unwrap_or_else(|| args.model_dir.display().to_string()),
        rank: args.rank,
        world_size: args.world_size,
        device_ranks: match args.device {
            DeviceSpec::CudaShared { .. } => args.world_size,
            _ => 1,
        },
    };
    let text = TextContext::new(tokenizer, cfg.eos_token_ids.clone());
    let settings = args.adapter_settings();
    let loader = AdapterLoader::new(
        &settings,
        BaseModules::from_config(&cfg).split(model.local_shape()),
        &device,
    )
    .context("setting up adapters")?;
    tracing::info!(
        roots = ?settings.roots,
        budget = settings.memory_budget,
        slots = settings.max_slots,
        merge_threads = settings.merge_threads,
        "adapter slots ready"
    );
    tracing::info!(backend = ?args.lora_backend, "LoRA products");
    let store = AdapterStore::new(
        settings.max_slots,
        settings.memory_budget,
        args.lora_backend,
    );
    let engine = Engine::new(model, kv, text, info, store)
        .with_kv_sizing(sizing)
        .with_cuda_graphs(args.cuda_graphs == Switch::On);
    let thread = EngineThreadSettings {
        heap_trim_interval: (args.heap_trim_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(args.heap_trim_interval_ms)),
        decode_ahead: args.decode_ahead,
    };
    let (handle, join) = EngineHandle::spawn_with(engine, thread)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = crate::server::ShardServer::new(handle, Arc::new(loader)).with_rank(args.rank);
    runtime.block_on(crate::server::serve_uds(
        server,
        &args.uds_path,
        shutdown_signal(),
    ))?;
    drop(runtime);
    let _ = join.join();
    Ok(())
}
