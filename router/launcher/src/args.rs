//! `medley serve` arguments. Every flag can also be given as an environment variable (TGI and
//! LoRAX names where they exist), which is how the Helm chart and containers configure it.

use medley_shard::model::quant::Quantize;
use std::path::PathBuf;
use std::time::Duration;

use medley_router::config::RouterArgs;
use medley_shard::comm::CommKind;
use medley_shard::device::DeviceSpec;

/// Compute dtype requested from the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DType {
    /// The checkpoint's own dtype (f32 on CPU when the checkpoint is half precision and the
    /// device cannot run it; the shard decides).
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl DType {
    /// The value passed to `medley-shard --dtype`.
    pub fn as_arg(self) -> &'static str {
        match self {
            DType::Auto => "auto",
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

/// What `medley serve` does when a shard dies or stops answering while serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShardRestart {
    /// Restart every shard of the group (the router reconnects by itself).
    OnFailure,
    /// Stop everything and exit with code 5.
    Never,
}

/// Arguments of `medley serve`: the launcher's own flags plus the router's ([`RouterArgs`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model to serve: a local directory (config.json, tokenizer.json, model.safetensors or an
    /// index + shards), a local `.gguf` file, or a Hugging Face hub id `org/name`. For a hub
    /// repository of GGUF files, `org/name:TAG` serves the one `.gguf` file whose name contains
    /// the quantization tag (case-insensitive), e.g.
    /// `TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:Q4_K_M` (or see `--gguf-file`). Without it, the
    /// demo model embedded in this binary is served as `medley-demo/base`, with its adapters
    /// `medley-demo/sql`, `medley-demo/ad` and `medley-demo/instruct` available offline.
    #[arg(long, env = "MODEL_ID")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit sha) of `--model`; defaults to `main`.
    #[arg(long, env = "REVISION")]
    pub revision: Option<String>,
    /// The `.gguf` file to serve out of the hub repository `--model` (a repository holding
    /// several quantizations and no config.json): only that file is downloaded, or found in
    /// the Hugging Face cache, and it is served like a local GGUF file. Example:
    /// `medley serve --model TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF --gguf-file
    /// tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf`. Split files (`-00001-of-0000N.gguf`) are refused:
    /// merge them with `llama-gguf-split --merge` first.
    #[arg(long, env = "MEDLEY_GGUF_FILE")]
    pub gguf_file: Option<String>,
    /// Number of tensor-parallel shards (one `medley-shard` process each).
    #[arg(long, env = "NUM_SHARD", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub num_shard: u32,
    /// Device of the shards: cpu, cuda (rank r on GPU r), cuda:N (rank r on GPU N + r) or
    /// cuda:N:shared (every rank on GPU N; collectives through host memory).
    /// CUDA needs a binary built with the `cuda` feature (scripts/cuda/build.sh).
    #[arg(long, env = "MEDLEY_DEVICE", default_value = "cpu", value_parser = DeviceSpec::parse_flag)]
    pub device: DeviceSpec,
    /// Collectives between tensor-parallel ranks: auto (NCCL when every rank has a GPU of its
    /// own, shared memory otherwise), shm (through host shared memory), or nccl (also at one
    /// rank, to check NCCL on a one-GPU machine). NCCL refuses two ranks on one GPU.
    #[arg(long, env = "TP_COMM", default_value = "auto")]
    pub tp_comm: CommKind,
    /// Compute dtype of the shards.
    #[arg(long, env = "DTYPE", value_enum, default_value_t = DType::Auto)]
    pub dtype: DType,
    /// How the shards hold the projection weights: auto (keep for a GGUF file on the CPU, none
    /// otherwise), none (dequantize at load), keep (a GGUF file's quantized tensors as stored),
    /// or a GGML type to quantize dense weights to at load: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k,
    /// q5_k, q6_k. LoRA adapters and merges stay in floating point on top.
    #[arg(long, env = "QUANTIZE", default_value = "auto", value_parser = Quantize::parse)]
    pub quantize: Quantize,
    /// Prefix of the shards' Unix sockets: rank `r` listens on `{path}-{r}`.
    #[arg(long, env = "SHARD_UDS_PATH", default_value = "/tmp/medley-server")]
    pub shard_uds_path: PathBuf,
    /// A separate shard executable (e.g. `medley-shard`); by default `medley` runs its own
    /// hidden `shard` subcommand.
    #[arg(long, env = "MEDLEY_SHARD_BIN")]
    pub shard_bin: Option<PathBuf>,
    /// Tokens the KV cache of each shard may hold. Unset, a shard on a GPU sizes it at the
    /// warm-up to what --gpu-memory-utilization leaves of the GPU's memory, and a shard on the
    /// CPU from a fixed 2 GiB budget; either budget (or the shard's `KV_CACHE_BYTES`, inherited
    /// from this environment) is divided by the bytes one token takes for the model (K and V
    /// over layers x KV heads x head dim x dtype size). Set this to choose the token count.
    #[arg(long, env = "KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<u64>,
    /// Share of each GPU's memory a shard may fill: the weights, the largest step's
    /// activations, the adapter budget and a KV cache sized to the rest at the warm-up; the
    /// remainder stays free (default 0.9, as vLLM's). Ignored on the CPU and with
    /// --kv-cache-tokens.
    #[arg(long, env = "GPU_MEMORY_UTILIZATION", value_parser = medley_shard::cli::parse_utilization)]
    pub gpu_memory_utilization: Option<f64>,
    /// Tokens per KV-cache block (`medley-shard --kv-block-size`, default 16): the unit the
    /// pool is allocated in and prefixes are shared at.
    #[arg(long, env = "KV_BLOCK_SIZE", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub kv_block_size: Option<u32>,
    /// Reuse the KV blocks of prompt prefixes already computed under the same adapter or
    /// merge (`medley-shard --prefix-caching`; on by default).
    #[arg(long, env = "PREFIX_CACHING", value_enum)]
    pub prefix_caching: Option<medley_shard::cli::Switch>,
    /// Replay decode steps from CUDA graphs (`medley-shard --cuda-graphs`; off by default): on
    /// a GPU at world size 1, each batch's decode step is recorded once and then launched as
    /// one graph instead of a few hundred kernels. Ignored on the CPU.
    #[arg(long, env = "CUDA_GRAPHS", value_enum)]
    pub cuda_graphs: Option<medley_shard::cli::Switch>,
    /// Bytes of adapter weights each shard may hold in its adapter slots (`medley-shard
    /// --adapter-memory-budget`); defaults to the shard's own choice.
    /// Plain bytes or with a unit (`512MiB`, `2GiB`).
    #[arg(long, env = "ADAPTER_MEMORY_BUDGET", value_parser = medley_shard::adapters::config::parse_byte_size)]
    pub adapter_memory_budget: Option<u64>,
    /// Number of adapter slots of each shard (`medley-shard --max-adapter-slots`); defaults to
    /// the shard's own choice.
    #[arg(long, env = "MAX_ADAPTER_SLOTS")]
    pub max_adapter_slots: Option<u32>,
    /// When a shard dies, or stops answering health checks (it hangs, or its tensor-parallel
    /// group broke): `on-failure` restarts every shard of the group while the router keeps
    /// running (requests in flight fail with 503 / UNAVAILABLE, `/health` is red until the
    /// shards are back, adapters load again on demand); `never` stops and exits with code 5.
    #[arg(long, env = "SHARD_RESTART", value_enum, default_value_t = ShardRestart::OnFailure)]
    pub shard_restart: ShardRestart,
    /// Seconds to wait for every shard to become ready.
    #[arg(long, env = "SHARD_STARTUP_TIMEOUT", default_value_t = 600)]
    pub shard_startup_timeout: u64,
    /// Seconds the router and the shards get to stop after SIGTERM/SIGINT before they are killed.
    #[arg(long, env = "GRACEFUL_TERMINATION_TIMEOUT", default_value_t = 90)]
    pub graceful_termination_timeout: u64,
    /// Hugging Face hub cache directory; defaults to `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    pub huggingface_hub_cache: Option<PathBuf>,
    /// Router flags (ports, limits, batching, logging).
    #[command(flatten)]
    pub router: RouterArgs,
}

impl ServeArgs {
    /// `--shard-startup-timeout` as a duration.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.shard_startup_timeout)
    }

    /// `--graceful-termination-timeout` as a duration.
    pub fn termination_timeout(&self) -> Duration {
        Duration::from_secs(self.graceful_termination_timeout)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(std::iter::once("medley").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("parse {args:?}: {e}"));
        match cli.command {
            Command::Serve(args) => *args,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    /// Marker variable that turns [`env_probe`] from a no-op into the real check; only the child
    /// process started by [`env_vars_are_honoured`] sets it.
    const PROBE_MARKER: &str = "MEDLEY_TEST_ENV_PROBE";

    #[test]
    fn flags_parse() {
        let args = serve(&[
            "serve",
            "--model",
            "org/name",
            "--revision",
            "v1",
            "--gguf-file",
            "m.Q4_K_M.gguf",
            "--num-shard",
            "2",
            "--dtype",
            "bf16",
            "--shard-uds-path",
            "/run/x",
            "--shard-bin",
            "/opt/medley-shard",
            "--kv-cache-tokens",
            "4096",
            "--adapter-memory-budget",
            "1000000",
            "--max-adapter-slots",
            "16",
            "--adapter-root",
            "/srv/adapters",
            "--shard-startup-timeout",
            "5",
            "--graceful-termination-timeout",
            "7",
            "--huggingface-hub-cache",
            "/data/hub",
            "--port",
            "9000",
            "--grpc-port",
            "9001",
            "--max-input-length",
            "100",
        ]);
        assert_eq!(args.model.as_deref(), Some("org/name"));
        assert_eq!(args.revision.as_deref(), Some("v1"));
        assert_eq!(args.gguf_file.as_deref(), Some("m.Q4_K_M.gguf"));
        assert_eq!(args.num_shard, 2);
        assert_eq!(args.dtype, DType::Bf16);
        assert_eq!(args.shard_uds_path, PathBuf::from("/run/x"));
        assert_eq!(args.shard_bin, Some(PathBuf::from("/opt/medley-shard")));
        assert_eq!(args.kv_cache_tokens, Some(4096));
        assert_eq!(args.adapter_memory_budget, Some(1_000_000));
        assert_eq!(args.max_adapter_slots, Some(16));
        assert_eq!(
            args.router.adapter_roots,
            vec![PathBuf::from("/srv/adapters")]
        );
        assert_eq!(args.startup_timeout(), Duration::from_secs(5));
        assert_eq!(args.termination_timeout(), Duration::from_secs(7));
        assert_eq!(args.huggingface_hub_cache, Some(PathBuf::from("/data/hub")));
        assert_eq!(args.router.port, 9000);
        assert_eq!(args.router.grpc_port, 9001);
        assert_eq!(args.router.max_input_length, Some(100));
    }

    #[test]
    fn invalid_values_are_rejected() {
        for bad in [
            &["serve", "--num-shard", "0"][..],
            &["serve", "--dtype", "f64"],
            &["serve", "--shard-startup-timeout", "-1"],
            &["serve", "--bogus"],
        ] {
            let argv = std::iter::once("medley").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} should fail");
        }
    }

    /// `--kv-cache-tokens`'s help states the real defaults: sized from the GPU's memory at the
    /// warm-up (`--gpu-memory-utilization`), and on the CPU the shard's fixed 2 GiB budget
    /// (`medley_shard::cli::DEFAULT_KV_CACHE_BYTES`), each divided by the bytes per token.
    #[test]
    fn kv_cache_tokens_help_states_the_defaults() {
        assert_eq!(
            medley_shard::cli::DEFAULT_KV_CACHE_BYTES,
            2 << 30,
            "the shard's default KV-cache budget on the CPU changed: update the \
             `--kv-cache-tokens` help, the chart's `kvCacheTokens` comment and the README"
        );
        assert_eq!(
            medley_shard::engine::DEFAULT_GPU_MEMORY_UTILIZATION,
            0.9,
            "the default --gpu-memory-utilization changed: update its help, the chart's \
             `gpuMemoryUtilization` and the README"
        );
        let mut cli = <Cli as clap::CommandFactory>::command();
        let serve = cli.find_subcommand_mut("serve").expect("serve subcommand");
        let help = |long: &str| {
            let arg = serve
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap_or_else(|| panic!("--{long}"));
            arg.get_long_help()
                .or(arg.get_help())
                .expect("help text")
                .to_string()
        };
        let tokens = help("kv-cache-tokens");
        let share = help("gpu-memory-utilization");
        // The rendered help, with line wrapping undone.
        let rendered = serve.render_long_help().to_string();
        let rendered = rendered.split_whitespace().collect::<Vec<_>>().join(" ");
        for text in [&tokens, &rendered] {
            assert!(text.contains("2 GiB"), "{text}");
            assert!(text.contains("bytes one token takes"), "{text}");
            assert!(
                text.contains("--gpu-memory-utilization leaves of the GPU's memory"),
                "{text}"
            );
        }
        assert!(share.contains("default 0.9"), "{share}");
    }

    /// The chart's comments on `model.kvCacheTokens` and `model.gpuMemoryUtilization` state the
    /// same defaults as the flags.
    #[test]
    fn chart_kv_comments_state_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/helm/medley/values.yaml");
        let values = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let lines: Vec<&str> = values.lines().map(str::trim).collect();
        let comment_above = |key: &str| {
            let at = lines
                .iter()
                .position(|l| l.starts_with(key))
                .unwrap_or_else(|| panic!("{key} in values.yaml"));
            let first = lines[..at]
                .iter()
                .rposition(|l| !l.starts_with('#'))
                .map_or(0, |i| i + 1);
            lines[first..at]
                .iter()
                .map(|l| l.trim_start_matches('#').trim())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let tokens = comment_above("kvCacheTokens:");
        assert!(tokens.contains("2 GiB"), "{tokens}");
        assert!(tokens.contains("gpuMemoryUtilization"), "{tokens}");
        let share = comment_above("gpuMemoryUtilization:");
        assert!(share.contains("0.9"), "{share}");
    }

    /// Runs `env_probe` in a child process of this test binary with `env` as its whole
    /// environment, so no test mutates the environment of this (multi-threaded) process.
    fn run_probe(mode: &str, env: &[(&str, &str)]) {
        let exe = std::env::current_exe().expect("test binary path");
        let mut command = std::process::Command::new(exe);
        command.env_clear();
        // The loader's search path is not configuration: a CUDA build needs it to start at all.
        if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
            command.env("LD_LIBRARY_PATH", path);
        }
        let output = command
            .args(["--exact", "args::tests::env_probe", "--nocapture"])
            .env(PROBE_MARKER, mode)
            .envs(env.iter().copied())
            .output()
            .expect("run the env probe");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "env probe ({mode}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Guard against the filter matching nothing (which would also succeed).
        assert!(stdout.contains("1 passed"), "probe did not run:\n{stdout}");
    }

    #[test]
    fn env_vars_are_honoured() {
        run_probe(
            "env",
            &[
                ("MODEL_ID", "org/from-env"),
                ("REVISION", "refs/pr/1"),
                ("MEDLEY_GGUF_FILE", "env.Q8_0.gguf"),
                ("NUM_SHARD", "3"),
                ("DTYPE", "f16"),
                ("SHARD_UDS_PATH", "/tmp/env-sock"),
                ("MEDLEY_SHARD_BIN", "/env/medley-shard"),
                ("KV_CACHE_TOKENS", "77"),
                ("GPU_MEMORY_UTILIZATION", "0.8"),
                ("ADAPTER_MEMORY_BUDGET", "4096"),
                ("MAX_ADAPTER_SLOTS", "3"),
                ("ADAPTER_ROOTS", "/a,/b"),
                ("MERGE_SEMANTICS", "lorax"),
                ("SHARD_STARTUP_TIMEOUT", "11"),
                ("GRACEFUL_TERMINATION_TIMEOUT", "12"),
                ("HUGGINGFACE_HUB_CACHE", "/env/hub"),
                ("PORT", "18080"),
                ("JSON_OUTPUT", "true"),
            ],
        );
    }

    #[test]
    fn defaults_without_env() {
        run_probe("defaults", &[]);
    }

    /// The child side of [`run_probe`]; a no-op in a normal test run.
    #[test]
    fn env_probe() {
        let Some(mode) = std::env::var_os(PROBE_MARKER) else {
            return;
        };
        let args = serve(&["serve"]);
        if mode == "defaults" {
            assert_eq!(args.model, None);
            assert_eq!(args.revision, None);
            assert_eq!(args.gguf_file, None);
            assert_eq!(args.num_shard, 1);
            assert_eq!(args.dtype, DType::Auto);
            assert_eq!(args.shard_uds_path, PathBuf::from("/tmp/medley-server"));
            assert_eq!(args.shard_bin, None);
            assert_eq!(args.kv_cache_tokens, None);
            assert_eq!(args.gpu_memory_utilization, None);
            assert_eq!(args.adapter_memory_budget, None);
            assert_eq!(args.max_adapter_slots, None);
            assert!(args.router.adapter_roots.is_empty());
            assert_eq!(args.startup_timeout(), Duration::from_secs(600));
            assert_eq!(args.termination_timeout(), Duration::from_secs(90));
            assert_eq!(args.huggingface_hub_cache, None);
            assert_eq!(args.router.port, 8080);
            assert_eq!(args.router.grpc_port, 8081);
            assert!(!args.router.json_output);
            return;
        }
        assert_eq!(args.model.as_deref(), Some("org/from-env"));
        assert_eq!(args.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(args.gguf_file.as_deref(), Some("env.Q8_0.gguf"));
        assert_eq!(args.num_shard, 3);
        assert_eq!(args.dtype, DType::F16);
        assert_eq!(args.shard_uds_path, PathBuf::from("/tmp/env-sock"));
        assert_eq!(args.shard_bin, Some(PathBuf::from("/env/medley-shard")));
        assert_eq!(args.kv_cache_tokens, Some(77));
        assert_eq!(args.gpu_memory_utilization, Some(0.8));
        assert_eq!(args.adapter_memory_budget, Some(4096));
        assert_eq!(args.max_adapter_slots, Some(3));
        assert_eq!(
            args.router.adapter_roots,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(args.router.merge_semantics, medley_spec::Semantics::Lorax);
        assert_eq!(args.shard_startup_timeout, 11);
        assert_eq!(args.graceful_termination_timeout, 12);
        assert_eq!(args.huggingface_hub_cache, Some(PathBuf::from("/env/hub")));
        assert_eq!(args.router.port, 18080);
        assert!(args.router.json_output);
        // A flag still wins over its environment variable.
        let args = serve(&["serve", "--num-shard", "1", "--model", "/m"]);
        assert_eq!(args.num_shard, 1);
        assert_eq!(args.model.as_deref(), Some("/m"));
    }
}
