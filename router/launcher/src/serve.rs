//! The `medley serve` sequence: check flags → resolve the model → start the shards → wait until
//! they are ready → run the router → when a shard dies or hangs, restart the group while the
//! router keeps running (`--shard-restart on-failure`, see [`super::group`]) → on a signal, a
//! router failure, or a shard failure that is not restarted, stop the router, then the shards.
//! A second signal during the shutdown skips the grace periods.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::args::ServeArgs;
use super::args::ShardRestart;
use super::embedded;
use super::group::{Group, GroupFailure, GroupPolicy};
use super::hub::HubSettings;
use super::probe::{HealthRpcProbe, ReadinessProbe};
use super::resolve::{ModelSource, ResolveRequest, resolve_model};
use super::signals::{ShutdownSignals, SignalSource};
use super::supervisor::{
    ShardCommand, ShardKvFlags, ShardOtlp, Supervisor, SupervisorConfig, socket_path,
};
use super::{BoxError, LauncherError};
use medley_router::config::RouterConfig;

/// Name of the shard executable.
pub const SHARD_BIN_NAME: &str = "medley-shard";

/// The router stage: runs until its shutdown future resolves, then returns.
pub type RouterFuture = BoxFuture<'static, Result<(), BoxError>>;

/// Everything `serve_with` needs besides the signals and the router.
pub struct ServePlan {
    /// The parsed flags.
    pub args: ServeArgs,
    /// Model resolution inputs (flags + `HF_*` environment).
    pub resolve: ResolveRequest,
    /// The shard executable.
    pub shard_bin: ShardProgram,
    /// How shard readiness (and, while serving, health) is checked.
    pub probe: Arc<dyn ReadinessProbe>,
    /// How the group is watched and restarted.
    pub group: GroupPolicy,
}

impl ServePlan {
    /// Builds the plan from the flags and the process environment.
    pub fn from_args(args: ServeArgs) -> Result<Self, LauncherError> {
        if args.shard_bin.is_none() {
            // The shards are this binary: refuse a device it was built without before resolving
            // (and maybe downloading) the model. A separate `--shard-bin` decides for itself.
            args.device.check_built()?;
        }
        args.tp_comm
            .resolve(args.device, args.num_shard)
            .map_err(LauncherError::Comm)?;
        let shard_bin = find_shard_binary(args.shard_bin.as_deref())?;
        let resolve = ResolveRequest {
            model: args.model.clone(),
            revision: args.revision.clone(),
            gguf_file: args.gguf_file.clone(),
            hub: HubSettings::from_env(args.huggingface_hub_cache.clone()),
            embedded_bases: embedded::default_bases(),
            gguf_bases: crate::staged::cache_bases("gguf"),
        };
        Ok(Self {
            group: GroupPolicy::new(args.shard_restart),
            args,
            resolve,
            shard_bin,
            probe: Arc::new(HealthRpcProbe::default()),
        })
    }
}

/// `medley serve` with the real signals, shards and router.
pub async fn serve(args: ServeArgs) -> Result<(), LauncherError> {
    let signals = ShutdownSignals::install().map_err(LauncherError::Signals)?;
    serve_with(ServePlan::from_args(args)?, signals, run_router).await
}

/// The production router stage: connect to the shards, then serve HTTP + gRPC.
pub fn run_router(config: RouterConfig, shutdown: BoxFuture<'static, ()>) -> RouterFuture {
    Box::pin(async move {
        let (config, backend) = medley_router::backend::connect(config).await?;
        medley_router::server::run(config, backend, shutdown).await?;
        Ok(())
    })
}

/// How the serving stage ended.
enum Outcome {
    Signal,
    ShardDied(GroupFailure),
    RestartFailed(GroupFailure, super::supervisor::SupervisorError),
    RouterReturned(Result<(), BoxError>),
}

/// The whole sequence with injectable signals and router stage (see the module docs).
pub async fn serve_with<S, R>(
    plan: ServePlan,
    mut signals: S,
    router: R,
) -> Result<(), LauncherError>
where
    S: SignalSource,
    R: FnOnce(RouterConfig, BoxFuture<'static, ()>) -> RouterFuture,
{
    let ServePlan {
        args,
        resolve,
        shard_bin,
        probe,
        group: policy,
    } = plan;
    // Fail on inconsistent limits before downloading anything.
    args.router
        .clone()
        .into_config(String::new(), PathBuf::new(), Vec::new())?;
    let model = tokio::select! {
        model = resolve_model(&resolve) => model?,
        signal = signals.next() => {
            tracing::info!(%signal, "stopping during model resolution");
            return Ok(());
        }
    };
    let world_size = args.num_shard as usize;
    let sockets = (0..world_size)
        .map(|rank| socket_path(&args.shard_uds_path, rank))
        .collect();
    let grace = args.termination_timeout();
    // Default token limits follow the model's positions, which the router reads from the
    // shards' `Info` once they run.
    let router_config = args.router.clone().into_config(
        model.model_id.clone(),
        model.files.tokenizer.clone(),
        sockets,
    )?;
    tracing::info!(
        model_id = %model.model_id,
        dir = %model.files.dir.display(),
        source = ?model.source,
        shards = world_size,
        shard_bin = %shard_bin.path.display(),
        "starting the shards"
    );
    let supervisor_config = SupervisorConfig {
        command: ShardCommand {
            program: shard_bin.path,
            program_args: shard_bin.leading_args,
            model_dir: model.files.dir.clone(),
            model_id: model.model_id.clone(),
            device: args.device,
            comm: args.tp_comm,
            dtype: args.dtype,
            quantize: args.quantize,
            kv: ShardKvFlags {
                tokens: args.kv_cache_tokens,
                gpu_memory_utilization: args.gpu_memory_utilization,
                block_size: args.kv_block_size,
                prefix_caching: args.prefix_caching,
                cuda_graphs: args.cuda_graphs,
            },
            adapter_roots: router_config.limits.adapters.adapter_roots.clone(),
            builtin_adapters: match model.source {
                ModelSource::Embedded => crate::embedded::builtin_adapters(&model.files.dir),
                _ => Vec::new(),
            },
            adapter_memory_budget: args.adapter_memory_budget,
            max_adapter_slots: args.max_adapter_slots,
            huggingface_hub_cache: args.huggingface_hub_cache.clone(),
            // The shards export to the router's collector.
            otlp: medley_router::telemetry::otlp_config(&args.router).map(|c| ShardOtlp {
                endpoint: c.endpoint,
                service_name: medley_router::telemetry::shard_service_name(&c.service_name),
            }),
        },
        world_size,
        uds_prefix: args.shard_uds_path.clone(),
        startup_timeout: args.startup_timeout(),
        termination_timeout: grace,
    };
    let mut supervisor = Supervisor::spawn(supervisor_config.clone()).await?;

    let ready = tokio::select! {
        ready = supervisor.wait_ready(probe.as_ref()) => ready.map(|()| false),
        signal = signals.next() => {
            tracing::info!(%signal, "stopping during shard startup");
            Ok(true)
        }
    };
    match ready {
        Ok(false) => {}
        Ok(true) => {
            stop_shards(supervisor, &mut signals).await;
            return Ok(());
        }
        Err(e) => {
            tracing::error!(error = %e, "shards failed to start");
            stop_shards(supervisor, &mut signals).await;
            return Err(e.into());
        }
    }

    tracing::info!(
        http = %router_config.http_addr,
        grpc = %router_config.grpc_addr,
        "shards ready: starting the router"
    );
    let stop_router = CancellationToken::new();
    let mut router_run = router(
        router_config,
        Box::pin(stop_router.clone().cancelled_owned()),
    );
    let mut group = Group::new(supervisor, supervisor_config, probe, policy);
    let outcome = loop {
        let failure = tokio::select! {
            result = &mut router_run => break Outcome::RouterReturned(result),
            signal = signals.next() => {
                tracing::info!(%signal, "shutting down");
                break Outcome::Signal;
            }
            failure = group.failed() => failure,
        };
        if group.restart_mode() == ShardRestart::Never {
            tracing::error!("{failure}; shutting down (--shard-restart never)");
            break Outcome::ShardDied(failure);
        }
        tracing::error!("{failure}; restarting the shards (--shard-restart on-failure)");
        // The router keeps serving (health red, requests refused with 503) meanwhile.
        tokio::select! {
            result = &mut router_run => break Outcome::RouterReturned(result),
            signal = signals.next() => {
                tracing::info!(%signal, "shutting down during a shard restart");
                break Outcome::Signal;
            }
            restarted = group.restart() => if let Err(e) = restarted {
                tracing::error!(error = %e, "giving up on restarting the shards");
                break Outcome::RestartFailed(failure, e);
            }
        }
    };
    if !matches!(outcome, Outcome::RouterReturned(_)) {
        stop_router.cancel();
        match drain_router(router_run, grace, &mut signals).await {
            Some(Err(e)) => tracing::warn!(error = %e, "router failed while stopping"),
            Some(Ok(())) => tracing::info!("router stopped"),
            None => {}
        }
    }
    if let Some(supervisor) = group.into_supervisor() {
        stop_shards(supervisor, &mut signals).await;
    }
    match outcome {
        Outcome::Signal => Ok(()),
        Outcome::ShardDied(failure) => Err(LauncherError::ShardDied(failure)),
        Outcome::RestartFailed(failure, error) => Err(LauncherError::RestartFailed {
            failure: Box::new(failure),
            error: Box::new(error),
        }),
        Outcome::RouterReturned(Err(e)) => Err(LauncherError::Router(e)),
        Outcome::RouterReturned(Ok(())) => {
            tracing::warn!("the router stopped on its own");
            Ok(())
        }
    }
}

/// Waits for the router to finish after its shutdown was requested, at most `grace`, or until
/// another signal. `None` when it was abandoned.
async fn drain_router(
    run: RouterFuture,
    grace: Duration,
    signals: &mut impl SignalSource,
) -> Option<Result<(), BoxError>> {
    tokio::select! {
        result = tokio::time::timeout(grace, run) => match result {
            Ok(result) => Some(result),
            Err(_) => {
                tracing::warn!(grace_s = grace.as_secs(), "router did not stop in time");
                None
            }
        },
        signal = signals.next() => {
            tracing::warn!(%signal, "signal received again: not waiting for the router");
            None
        }
    }
}

/// Stops the shards; another signal meanwhile kills them at once.
async fn stop_shards(supervisor: Supervisor, signals: &mut impl SignalSource) {
    let kill = supervisor.kill_switch();
    let shutdown = supervisor.shutdown();
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => return,
        signal = signals.next() => {
            tracing::warn!(%signal, "signal received again: killing the shards");
            kill.cancel();
        }
    }
    shutdown.await;
}

/// The program that runs a shard, and the arguments placed before the shard flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardProgram {
    /// Executable.
    pub path: PathBuf,
    /// Leading arguments (`["shard"]` when re-executing `medley` itself).
    pub leading_args: Vec<std::ffi::OsString>,
}

/// The shard executable: `explicit` (a path, or a name looked up on `PATH`, run as
/// `medley-shard`), else this very executable run as `medley shard ...` — one binary serves.
pub fn find_shard_binary(explicit: Option<&Path>) -> Result<ShardProgram, LauncherError> {
    let path_dirs =
        || std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let standalone = |path: PathBuf| ShardProgram {
        path,
        leading_args: vec![],
    };
    if let Some(bin) = explicit {
        if bin.components().count() > 1 {
            return if is_executable(bin) {
                Ok(standalone(bin.to_path_buf()))
            } else {
                Err(LauncherError::ShardBinary(format!(
                    "--shard-bin {} is not an executable file",
                    bin.display()
                )))
            };
        }
        return find_in_dirs(&path_dirs().unwrap_or_default(), bin)
            .map(standalone)
            .ok_or_else(|| {
                LauncherError::ShardBinary(format!("--shard-bin {} is not on PATH", bin.display()))
            });
    }
    let exe = std::env::current_exe().map_err(|e| {
        LauncherError::ShardBinary(format!(
            "cannot locate this executable to run the shards ({e}); pass --shard-bin"
        ))
    })?;
    Ok(ShardProgram {
        path: exe,
        leading_args: vec!["shard".into()],
    })
}

/// First `dir/name` among `dirs` that is an executable file.
fn find_in_dirs(dirs: &[PathBuf], name: &Path) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests;
