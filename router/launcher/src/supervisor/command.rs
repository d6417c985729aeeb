//! The shard command line: the flags every rank gets, and the rank-specific ones.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use medley_shard::comm::CommKind;
use medley_shard::device::DeviceSpec;
use medley_shard::model::quant::Quantize;

use crate::args::DType;

/// KV-cache and decode-step flags passed to every shard; `None` keeps the shard's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardKvFlags {
    /// `--kv-cache-tokens`.
    pub tokens: Option<u64>,
    /// `--gpu-memory-utilization`.
    pub gpu_memory_utilization: Option<f64>,
    /// `--kv-block-size`.
    pub block_size: Option<u32>,
    /// `--prefix-caching`.
    pub prefix_caching: Option<medley_shard::cli::Switch>,
    /// `--cuda-graphs`.
    pub cuda_graphs: Option<medley_shard::cli::Switch>,
}

/// The shard command line, identical for every rank but the rank-specific flags.
#[derive(Debug, Clone)]
pub struct ShardCommand {
    /// The shard executable (`medley-shard`, or `medley` itself).
    pub program: PathBuf,
    /// Arguments placed before the shard flags (`["shard"]` when `program` is `medley`).
    pub program_args: Vec<OsString>,
    /// `--model-dir`.
    pub model_dir: PathBuf,
    /// `--model-id`.
    pub model_id: String,
    /// `--device`.
    pub device: DeviceSpec,
    /// `--comm` (the collective backend).
    pub comm: CommKind,
    /// `--dtype`.
    pub dtype: DType,
    /// `--quantize`.
    pub quantize: Quantize,
    /// The shards' KV-cache flags.
    pub kv: ShardKvFlags,
    /// `--adapter-root`, once per directory.
    pub adapter_roots: Vec<PathBuf>,
    /// `--builtin-adapter ID=DIR`, once per adapter (the embedded demo's).
    pub builtin_adapters: Vec<medley_shard::adapters::BuiltinAdapter>,
    /// `--adapter-memory-budget`, if set.
    pub adapter_memory_budget: Option<u64>,
    /// `--max-adapter-slots`, if set.
    pub max_adapter_slots: Option<u32>,
    /// `--huggingface-hub-cache`, if set (adapters from the hub use the same cache as the model).
    pub huggingface_hub_cache: Option<PathBuf>,
    /// `--otlp-endpoint` and `--otlp-service-name`, when traces are exported.
    pub otlp: Option<ShardOtlp>,
}

/// Where the shards export their spans: the router's collector, under the shards' service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOtlp {
    /// `--otlp-endpoint`.
    pub endpoint: String,
    /// `--otlp-service-name`.
    pub service_name: String,
}

impl ShardCommand {
    /// The arguments of rank `rank` out of `world_size`, listening on `uds_path`.
    pub fn args(&self, rank: usize, world_size: usize, uds_path: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = self.program_args.clone();
        args.extend::<[OsString; 18]>([
            "--model-dir".into(),
            self.model_dir.clone().into(),
            "--uds-path".into(),
            uds_path.into(),
            "--rank".into(),
            rank.to_string().into(),
            "--world-size".into(),
            world_size.to_string().into(),
            "--device".into(),
            self.device.to_string().into(),
            "--comm".into(),
            self.comm.to_string().into(),
            "--dtype".into(),
            self.dtype.as_arg().into(),
            "--quantize".into(),
            self.quantize.as_arg().into(),
            "--model-id".into(),
            self.model_id.clone().into(),
        ]);
        if let Some(tokens) = self.kv.tokens {
            args.extend(["--kv-cache-tokens".into(), tokens.to_string().into()]);
        }
        if let Some(share) = self.kv.gpu_memory_utilization {
            args.extend(["--gpu-memory-utilization".into(), share.to_string().into()]);
        }
        if let Some(size) = self.kv.block_size {
            args.extend(["--kv-block-size".into(), size.to_string().into()]);
        }
        if let Some(switch) = self.kv.prefix_caching {
            args.extend(["--prefix-caching".into(), switch.as_arg().into()]);
        }
        if let Some(switch) = self.kv.cuda_graphs {
            args.extend(["--cuda-graphs".into(), switch.as_arg().into()]);
        }
        for root in &self.adapter_roots {
            args.extend(["--adapter-root".into(), root.clone().into()]);
        }
        for b in &self.builtin_adapters {
            let mut flag = OsString::from(format!("{}=", b.id));
            flag.push(&b.dir);
            args.extend(["--builtin-adapter".into(), flag]);
        }
        if let Some(bytes) = self.adapter_memory_budget {
            args.extend(["--adapter-memory-budget".into(), bytes.to_string().into()]);
        }
        if let Some(slots) = self.max_adapter_slots {
            args.extend(["--max-adapter-slots".into(), slots.to_string().into()]);
        }
        if let Some(cache) = &self.huggingface_hub_cache {
            args.extend(["--huggingface-hub-cache".into(), cache.clone().into()]);
        }
        if let Some(otlp) = &self.otlp {
            args.extend([
                "--otlp-endpoint".into(),
                otlp.endpoint.clone().into(),
                "--otlp-service-name".into(),
                otlp.service_name.clone().into(),
            ]);
        }
        args.push("--json-output".into());
        args
    }
}
