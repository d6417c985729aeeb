//! The shard's command line: `medley-shard ...` and the hidden `medley shard ...` (the launcher
//! re-executes itself so one binary is enough to serve).

mod run;

use crate::model::quant::Quantize;
use std::path::PathBuf;

use crate::adapters::config::{DEFAULT_MAX_SLOTS, default_merge_threads};
use crate::adapters::{AdapterSettings, LoraBackend, parse_byte_size};
use crate::comm::CommKind;
use crate::device::DeviceSpec;
use crate::engine::{DEFAULT_GPU_MEMORY_UTILIZATION, KvSizing};
use crate::kv_cache::DEFAULT_BLOCK_TOKENS;
use medley_hub::HubSettings;
pub use run::run;

/// An on/off flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Switch {
    /// The flag value (`on` / `off`).
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

/// Default `--kv-cache-bytes` on the CPU: a fixed 2 GiB KV-cache budget per shard. The capacity
/// in tokens is this divided by [`KvCache::bytes_per_token`]. On a GPU the default is to size
/// the cache from the GPU's memory at the warm-up ([`KvSizing::GpuMemory`]).
///
/// [`KvCache::bytes_per_token`]: crate::kv_cache::KvCache::bytes_per_token
pub const DEFAULT_KV_CACHE_BYTES: usize = 2 << 30;

/// Tokens of the KV cache a shard sizing it from the GPU's memory allocates at load, before
/// the warm-up replaces it (requests come only after the warm-up).
const PROVISIONAL_KV_TOKENS: usize = 4096;

/// Flags of one shard process (each also readable from the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct ShardArgs {
    /// Model directory in Hugging Face layout.
    #[arg(long, env = "MEDLEY_MODEL_DIR")]
    pub model_dir: PathBuf,
    /// Unix socket to serve on.
    #[arg(long, env = "MEDLEY_UDS_PATH")]
    pub uds_path: PathBuf,
    /// This shard's rank.
    #[arg(long, env = "RANK", default_value_t = 0)]
    pub rank: u32,
    /// Number of ranks.
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// The group's shared-memory file (the CPU collectives between ranks), the same for every
    /// rank and unique to the group; required with a world size above 1 (`medley serve` sets
    /// it). Best on a memory file system such as /dev/shm.
    #[arg(long, env = "MEDLEY_COMM_PATH")]
    pub comm_path: Option<PathBuf>,
    /// Collective backend: auto (NCCL when every rank has a GPU of its own, shared memory
    /// otherwise), shm, or nccl (see `medley_shard::comm::backend`).
    #[arg(long, env = "MEDLEY_COMM", default_value = "auto")]
    pub comm: CommKind,
    /// The NCCL group's unique id (hex), the same for every rank; required with NCCL above one
    /// rank (`medley serve` creates it). At world size 1 the rank makes its own.
    #[arg(long, env = "MEDLEY_NCCL_ID", hide_env_values = true)]
    pub nccl_id: Option<String>,
    /// Seconds a rank waits for the others at a collective (or to join) before the group is
    /// declared failed.
    #[arg(long, env = "MEDLEY_COMM_TIMEOUT", default_value_t = 60)]
    pub comm_timeout: u64,
    /// Device: cpu, cuda (rank r on GPU r), cuda:N (rank r on GPU N + r) or cuda:N:shared
    /// (every rank on GPU N). CUDA needs a binary built with the `cuda` feature.
    #[arg(long, env = "MEDLEY_DEVICE", default_value = "cpu", value_parser = DeviceSpec::parse_flag)]
    pub device: DeviceSpec,
    /// Compute dtype: auto (the checkpoint's), f32, bf16, f16.
    #[arg(long, env = "DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Projection weights: auto (keep for a GGUF file on the CPU, none otherwise), none, keep,
    /// or a GGML type to quantize to at load (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k).
    #[arg(long, env = "QUANTIZE", default_value = "auto", value_parser = Quantize::parse)]
    pub quantize: Quantize,
    /// Model name reported by `Info`.
    #[arg(long, env = "MODEL_ID")]
    pub model_id: Option<String>,
    /// KV-cache capacity in tokens (overrides --kv-cache-bytes).
    #[arg(long, env = "KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// KV-cache budget in bytes; the capacity in tokens is this divided by the bytes one token
    /// takes (layers x KV heads x head dim x dtype size, for K and V). Unset: 2 GiB on the CPU;
    /// on a GPU, what --gpu-memory-utilization leaves, measured at the warm-up.
    #[arg(long, env = "KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,
    /// Share of the GPU's memory the shard may fill (weights, activations, adapters and a KV
    /// cache sized to the rest at the warm-up), in (0, 1]; default 0.9. Only on a GPU, and
    /// only when neither --kv-cache-tokens nor --kv-cache-bytes sets the cache's size.
    #[arg(long, env = "GPU_MEMORY_UTILIZATION", value_parser = parse_utilization)]
    pub gpu_memory_utilization: Option<f64>,
    /// Tokens per KV-cache block (the pool's unit of allocation and of prefix reuse).
    #[arg(long, env = "KV_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_TOKENS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub kv_block_size: u32,
    /// Reuse the KV blocks of prompt prefixes already computed under the same adapter or merge.
    #[arg(long, env = "PREFIX_CACHING", value_enum, default_value_t = Switch::On)]
    pub prefix_caching: Switch,
    /// Replay decode steps from CUDA graphs: each batch's decode step is recorded once (its
    /// second step) and then launched as one graph instead of a few hundred kernels. On a GPU at
    /// world size 1 with a dense embedding; elsewhere ignored.
    #[arg(long, env = "CUDA_GRAPHS", value_enum, default_value_t = Switch::Off)]
    pub cuda_graphs: Switch,
    /// Directory local adapters may be loaded from (repeat the flag, or separate with commas).
    /// Relative adapter ids resolve under the first root; absolute ids must lie inside one.
    /// Without roots, local adapters are refused.
    #[arg(long = "adapter-root", env = "ADAPTER_ROOTS", value_delimiter = ',')]
    pub adapter_roots: Vec<PathBuf>,
    /// A hub adapter id answered from a local PEFT directory, offline (`ID=DIR`; repeat the
    /// flag): `medley serve` passes the adapters of its embedded demo model this way.
    #[arg(long = "builtin-adapter", value_name = "ID=DIR")]
    pub builtin_adapters: Vec<crate::adapters::BuiltinAdapter>,
    /// Bytes of adapter weights all slots may hold together: plain bytes or a unit (512MiB,
    /// 2GiB, 1.5GB).
    #[arg(long, env = "ADAPTER_MEMORY_BUDGET", default_value = "1GiB", value_parser = parse_byte_size)]
    pub adapter_memory_budget: u64,
    /// Number of adapter slots (slot 0, the base model, excluded), at most 65536.
    #[arg(
        long,
        env = "MAX_ADAPTER_SLOTS",
        default_value_t = DEFAULT_MAX_SLOTS,
        value_parser = clap::value_parser!(u32).range(0..=65536)
    )]
    pub max_adapter_slots: u32,
    /// How LoRA products are computed: kernels (Medley's batched SGMV/BGMV kernels, on the CPU
    /// or the GPU) or candle (candle matmuls per adapter group; a fallback).
    #[arg(long, env = "LORA_BACKEND", value_enum, default_value_t = LoraBackend::Kernels)]
    pub lora_backend: LoraBackend,
    /// Threads for adapter merges, apart from the forward pass's (default: half the cores).
    #[arg(long, env = "MERGE_THREADS")]
    pub merge_threads: Option<usize>,
    /// Hugging Face cache directory for hub adapters (default: HF_HUB_CACHE, HF_HOME/hub,
    /// ~/.cache/huggingface/hub).
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    pub huggingface_hub_cache: Option<PathBuf>,
    /// Multiply each attention block's q, k and v projections, and each MLP's gate and up, as
    /// one matmul (dense weights): fewer GEMM launches per step on a GPU, but another GEMM shape
    /// than transformers', so half-precision results may differ from it by a rounding.
    #[arg(
        long,
        env = "MEDLEY_STACK_PROJECTIONS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub stack_projections: bool,
    /// Threads of the forward pass (default: RAYON_NUM_THREADS if set, else the CPUs this
    /// process may use).
    #[arg(long, env = "MEDLEY_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Shortest time in milliseconds between two returns of freed heap memory to the operating
    /// system (glibc `malloc_trim`, on the engine thread between commands); 0 never trims.
    #[arg(long, env = "HEAP_TRIM_INTERVAL_MS", default_value_t = 1000)]
    pub heap_trim_interval_ms: u64,
    /// After answering a step, run the batch's next decode step at once, before the router
    /// asks for it, so the router's part of a step (answering the streams, the next call)
    /// overlaps the shard's. Same tokens; `false` waits for each call.
    #[arg(
        long,
        env = "MEDLEY_DECODE_AHEAD",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub decode_ahead: bool,
    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    pub json_output: bool,
    /// OpenTelemetry collector to export spans to, over OTLP/gRPC (e.g.
    /// `http://collector:4317`); `medley serve` passes the router's. Without it no tracing
    /// exporter is installed.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the shard's spans (the rank is the `shard.rank` resource attribute).
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "medley-shard")]
    pub otlp_service_name: String,
}

/// Fixes the forward pass's thread count for this process and returns it: `requested`, else a
/// positive `RAYON_NUM_THREADS`, else the CPUs available to the process. The count is written
/// to `RAYON_NUM_THREADS`, which sizes rayon's global pool (the `medley_kernels` projections)
/// and which candle reads on every CPU matmul: without it candle counts physical cores by
/// parsing `/proc/cpuinfo` each time (about 2% of a decode step on 2 cores, more on large
/// hosts).
///
/// Unless `CANDLE_NUM_THREADS` is set, it is set to 1, which leaves candle's barrier pool
/// without workers: candle's element-wise ops then run on the pool thread that runs the
/// forward pass (see [`crate::model::LlamaModel::forward`]) instead of on an extra thread that
/// spins for a while after every op and takes a core from the next projection (decode steps of
/// 16 rows ran about 8% faster on 2 cores in `benches/forward.rs`).
///
/// # Safety
/// Changes the environment: call it before the process starts any other thread.
pub unsafe fn configure_threads(requested: Option<u16>) -> usize {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let n = requested
        .map(usize::from)
        .or(from_env)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: the caller guarantees no other thread exists yet, so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    n
}

/// A `--gpu-memory-utilization` value: a share in (0, 1].
pub fn parse_utilization(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(u) if u > 0.0 && u <= 1.0 => Ok(u),
        _ => Err(format!(
            "`{s}` is not a share of the GPU's memory in (0, 1], e.g. 0.9"
        )),
    }
}

impl ShardArgs {
    /// How the KV cache is sized: on a GPU (`on_gpu`) from its memory unless the size is set;
    /// on the CPU as set, or 2 GiB.
    pub fn kv_sizing(&self, on_gpu: bool) -> KvSizing {
        let set = self.kv_cache_tokens.is_some() || self.kv_cache_bytes.is_some();
        if !on_gpu || set {
            if self.gpu_memory_utilization.is_some() {
                tracing::warn!(
                    "--gpu-memory-utilization applies only on a GPU without --kv-cache-tokens or --kv-cache-bytes: ignored"
                );
            }
            return KvSizing::Fixed;
        }
        KvSizing::GpuMemory {
            utilization: self
                .gpu_memory_utilization
                .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION),
        }
    }

    /// The adapter settings these flags describe (the parsed-adapter cache is as large as the
    /// slot budget).
    pub fn adapter_settings(&self) -> AdapterSettings {
        let mut s = AdapterSettings::new(HubSettings::from_env(self.huggingface_hub_cache.clone()));
        s.roots = self.adapter_roots.clone();
        s.builtin = self.builtin_adapters.clone();
        s.memory_budget = self.adapter_memory_budget;
        s.source_cache_bytes = self.adapter_memory_budget;
        s.max_slots = self.max_adapter_slots;
        s.merge_threads = self.merge_threads.unwrap_or_else(default_merge_threads);
        s
    }
}

fn parse_dtype(s: &str) -> anyhow::Result<Option<candle_core::DType>> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" => None,
        "f32" | "float32" => Some(candle_core::DType::F32),
        "bf16" | "bfloat16" => Some(candle_core::DType::BF16),
        "f16" | "float16" => Some(candle_core::DType::F16),
        other => anyhow::bail!("unknown --dtype `{other}` (auto, f32, bf16, f16)"),
    })
}

/// Installs the log subscriber of a shard process (stderr, text or JSON).
pub fn init_logging(json: bool) {
    if let Err(e) = install_subscriber(json, None) {
        eprintln!("cannot set up logging: {e}");
    }
}

/// Installs the log subscriber of a shard process (stderr, text or JSON) and, with
/// `--otlp-endpoint`, the layer that exports its spans over OTLP (service
/// `--otlp-service-name`, resource attribute `shard.rank`). Shut the returned handle down when
/// the shard stops: it exports the spans still buffered. A bad endpoint is an error; an
/// unreachable collector is only logged.
pub fn init_tracing(args: &ShardArgs) -> anyhow::Result<Option<medley_telemetry::Tracing>> {
    let otlp = args
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|endpoint| {
            medley_telemetry::OtlpConfig::new(endpoint, args.otlp_service_name.clone())
                .with_attribute(medley_telemetry::KeyValue::new(
                    "shard.rank",
                    i64::from(args.rank),
                ))
                .with_attribute(medley_telemetry::KeyValue::new(
                    "shard.world_size",
                    i64::from(args.world_size),
                ))
        });
    install_subscriber(args.json_output, otlp.as_ref())
}

fn install_subscriber(
    json: bool,
    otlp: Option<&medley_telemetry::OtlpConfig>,
) -> anyhow::Result<Option<medley_telemetry::Tracing>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (otel, exporter) = match otlp {
        Some(config) => {
            let (layer, exporter) = medley_telemetry::otlp::layer(config)?;
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    // The OTLP layer has its own filter: `RUST_LOG` only filters the log output.
    let registry = tracing_subscriber::registry().with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(fmt.json().with_filter(filter)).try_init()?;
    } else {
        registry.with(fmt.with_filter(filter)).try_init()?;
    }
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ShardArgs,
    }

    fn parse(extra: &[&str]) -> Result<ShardArgs, clap::Error> {
        let base = ["shard", "--model-dir", "/m", "--uds-path", "/s"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
    }

    #[test]
    fn the_kv_cache_is_sized_from_gpu_memory_unless_set_or_on_the_cpu() {
        let gpu = |u: f64| KvSizing::GpuMemory { utilization: u };
        let a = parse(&[]).unwrap();
        assert_eq!(a.kv_sizing(true), gpu(DEFAULT_GPU_MEMORY_UTILIZATION));
        assert_eq!(a.kv_sizing(false), KvSizing::Fixed);
        let a = parse(&["--gpu-memory-utilization", "0.5"]).unwrap();
        assert_eq!(a.kv_sizing(true), gpu(0.5));
        assert_eq!(a.kv_sizing(false), KvSizing::Fixed);
        for set in [
            ["--kv-cache-tokens", "4096"],
            ["--kv-cache-bytes", "1000000"],
        ] {
            let a = parse(&set).unwrap();
            assert_eq!(a.kv_sizing(true), KvSizing::Fixed, "{set:?}");
        }
        assert_eq!(
            parse(&["--gpu-memory-utilization", "1"])
                .unwrap()
                .gpu_memory_utilization,
            Some(1.0)
        );
        for bad in ["0", "-0.1", "1.01", "90%", "nan", ""] {
            let flag = format!("--gpu-memory-utilization={bad}");
            let e = parse(&[&flag]).expect_err(bad).to_string();
            assert!(
                e.contains("share of the GPU's memory in (0, 1]"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn adapter_flags() {
        let a = parse(&[
            "--adapter-root",
            "/a,/b",
            "--adapter-root",
            "/c",
            "--adapter-memory-budget",
            "512MiB",
            "--max-adapter-slots",
            "8",
            "--merge-threads",
            "3",
        ])
        .expect("valid");
        assert_eq!(
            a.adapter_roots,
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                PathBuf::from("/c")
            ]
        );
        let s = a.adapter_settings();
        assert_eq!(
            (s.memory_budget, s.max_slots, s.merge_threads),
            (512 << 20, 8, 3)
        );
        assert_eq!(s.source_cache_bytes, 512 << 20);
        // Plain bytes, as the launcher passes them.
        let b = parse(&["--adapter-memory-budget", "1000000"]).expect("bytes");
        assert_eq!(b.device, DeviceSpec::Cpu);
        assert!(!b.stack_projections);
        assert!(
            parse(&["--stack-projections"])
                .expect("flag")
                .stack_projections
        );
        let g = parse(&["--device", "cuda:1"]).expect("cuda:1");
        assert_eq!(g.device, DeviceSpec::Cuda { first: 1 });
        assert_eq!(b.adapter_memory_budget, 1_000_000);
        for bad in [
            &["--device", "tpu"][..],
            &["--adapter-memory-budget", "lots"],
            &["--max-adapter-slots", "100000"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
