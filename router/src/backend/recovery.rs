//! [`RecoveringBackend`]: serves through a [`ShardBackend`] while its shards live, and replaces
//! it when they die or restart.
//!
//! A monitor checks the shards every [`RecoveryConfig::poll_interval`]. When they stop
//! answering, report a broken tensor-parallel group, or turn out to be new processes (the
//! launcher restarted the group, see `medley serve --shard-restart`), the backend is stopped:
//! calls in flight end at once, running and queued requests fail with UNAVAILABLE (HTTP 503),
//! new requests are refused the same way and health is red. The monitor then reconnects until
//! the shards answer again, sets them up afresh (empty caches and adapter slots, warmup) and
//! serves again; adapters and merges load again on demand, and what operators preloaded (and
//! did not unload since) is preloaded again, with the same pins.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::mpsc::UnboundedReceiver;

use super::adapters::{AdapterView, AdminError, Residency};
use super::client::{ClientError, ShardedClient};
use super::{Backend, BackendError, BackendInfo, KvBlocks, ShardApi, ShardBackend, Unhealthy};
use crate::config::RouterConfig;
use crate::error::InferError;
use crate::infer::{AdapterKey, AdapterSpec, InferStreamResponse, ValidGenerateRequest};

/// Metric names of the recovery monitor.
mod names {
    pub const RECOVERIES: &str = "medley_shard_recoveries";
    pub const READY: &str = "medley_shards_ready";
}

/// Opens a fresh connection to the shards of the model.
pub trait Connector: Send + Sync + 'static {
    /// The connection.
    type Api: ShardApi;

    /// Connects to every rank.
    fn connect(&self) -> impl Future<Output = Result<Self::Api, ClientError>> + Send;
}

/// The shards on their Unix sockets, rank 0 first.
#[derive(Debug, Clone)]
pub struct UdsConnector {
    paths: Vec<PathBuf>,
}

impl UdsConnector {
    /// The shards listening on `paths`.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self { paths }
    }
}

impl Connector for UdsConnector {
    type Api = ShardedClient;

    async fn connect(&self) -> Result<ShardedClient, ClientError> {
        ShardedClient::connect(&self.paths).await
    }
}

/// Timing of the monitor.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// Time between two health checks while serving.
    pub poll_interval: Duration,
    /// Failed health checks in a row that stop the backend (a restarted shard stops it at once).
    pub failures: u32,
    /// Longest health check.
    pub health_timeout: Duration,
    /// Time between two reconnection attempts.
    pub retry_interval: Duration,
    /// Longest setup of reconnected shards (clearing, warmup).
    pub setup_timeout: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            failures: 2,
            health_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(500),
            setup_timeout: Duration::from_secs(600),
        }
    }
}

/// What the router serves through right now.
enum State<S: ShardApi> {
    Serving(Arc<ShardBackend<S>>),
    Recovering { reason: String },
}

struct Shared<S: ShardApi> {
    state: RwLock<State<S>>,
    info: RwLock<BackendInfo>,
    /// Adapters preloaded by operators and not unloaded since, with their pin: loaded again on
    /// new shards.
    preloaded: Mutex<HashMap<AdapterKey, (AdapterSpec, bool)>>,
}

impl<S: ShardApi> Shared<S> {
    fn serving(&self) -> Result<Arc<ShardBackend<S>>, String> {
        match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
            State::Serving(b) => Ok(b.clone()),
            State::Recovering { reason } => Err(reason.clone()),
        }
    }

    fn set(&self, state: State<S>) {
        if let State::Serving(b) = &state {
            *self.info.write().unwrap_or_else(|p| p.into_inner()) = b.info();
        }
        metrics::gauge!(names::READY).set(matches!(state, State::Serving(_)) as u8 as f64);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

/// A [`Backend`] that outlives the shard processes (see the module docs).
pub struct RecoveringBackend<C: Connector> {
    shared: Arc<Shared<C::Api>>,
    monitor: tokio::task::JoinHandle<()>,
}

impl<C: Connector> Drop for RecoveringBackend<C> {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

impl<C: Connector> RecoveringBackend<C> {
    /// Serves through `backend`, already started on shards reached with `connector`, and
    /// starts the monitor; `config` sets reconnected shards up the same way.
    pub fn new(
        backend: ShardBackend<C::Api>,
        connector: C,
        config: RouterConfig,
        recovery: RecoveryConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            info: RwLock::new(backend.info()),
            state: RwLock::new(State::Serving(Arc::new(backend))),
            preloaded: Mutex::new(HashMap::new()),
        });
        metrics::gauge!(names::READY).set(1.0);
        let monitor = tokio::spawn(monitor(shared.clone(), connector, config, recovery));
        Self { shared, monitor }
    }
}

impl<C: Connector> Backend for RecoveringBackend<C> {
    fn schedule(
        &self,
        request: ValidGenerateRequest,
    ) -> Result<UnboundedReceiver<Result<InferStreamResponse, InferError>>, InferError> {
        self.shared.serving_or_restarting()?.schedule(request)
    }

    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            match self.shared.serving() {
                Ok(backend) => backend.health().await,
                Err(_) => false,
            }
        })
    }

    fn info(&self) -> BackendInfo {
        self.shared
            .info
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn kv_blocks(&self) -> Option<KvBlocks> {
        self.shared.serving().ok()?.kv_blocks()
    }

    fn residency(&self) -> Result<Residency, AdminError> {
        self.shared.serving_or_restarting()?.residency()
    }

    fn preload(
        &self,
        spec: AdapterSpec,
        pinned: bool,
        wait: bool,
    ) -> BoxFuture<'_, Result<AdapterView, AdminError>> {
        Box::pin(async move {
            let backend = self.shared.serving_or_restarting()?;
            let key = spec.key();
            let view = backend.preload(spec.clone(), pinned, wait).await?;
            self.shared.preloads().insert(key, (spec, pinned));
            Ok(view)
        })
    }

    fn unload(&self, key: &str) -> Result<AdapterView, AdminError> {
        let view = self.shared.serving_or_restarting()?.unload(key)?;
        self.shared.preloads().remove(&view.key);
        Ok(view)
    }
}

impl<S: ShardApi> Shared<S> {
    /// The serving backend, or the UNAVAILABLE error of requests while the shards are away.
    fn serving_or_restarting(&self) -> Result<Arc<ShardBackend<S>>, InferError> {
        self.serving().map_err(|reason| restarting(&reason))
    }

    fn preloads(&self) -> std::sync::MutexGuard<'_, HashMap<AdapterKey, (AdapterSpec, bool)>> {
        self.preloaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Preloads again, on a new backend, what operators had preloaded.
async fn restore_preloads<S: ShardApi>(
    backend: Arc<ShardBackend<S>>,
    wanted: Vec<(AdapterSpec, bool)>,
) {
    for (spec, pinned) in wanted {
        match backend.preload(spec.clone(), pinned, true).await {
            Ok(view) => {
                tracing::info!(adapter = %spec.ids(), key = %view.key, pinned, "preloaded adapter restored")
            }
            Err(e) => {
                tracing::warn!(adapter = %spec.ids(), pinned, "cannot restore a preloaded adapter: {e}")
            }
        }
    }
}

/// The error of requests while the shards are away.
fn restarting(reason: &str) -> InferError {
    InferError::Unavailable(format!(
        "the shards are restarting ({reason}); retry shortly"
    ))
}

/// Watches the serving backend; replaces it when its shards fail (see the module docs).
async fn monitor<C: Connector>(
    shared: Arc<Shared<C::Api>>,
    connector: C,
    config: RouterConfig,
    rc: RecoveryConfig,
) {
    loop {
        let backend = match shared.serving() {
            Ok(b) => b,
            Err(reason) => {
                // Only this task leaves `Serving`; never here, but do not spin if it happens.
                tracing::error!(reason, "recovery monitor found no serving backend");
                return;
            }
        };
        let reason = watch(&backend, &rc).await;
        tracing::error!(
            reason,
            "the shards failed or restarted: failing their requests and reconnecting"
        );
        metrics::counter!(names::RECOVERIES).increment(1);
        shared.set(State::Recovering {
            reason: reason.clone(),
        });
        backend.stop(restarting(&reason)).await;
        drop(backend);
        let started = Instant::now();
        let backend = reconnect(&connector, &config, &rc).await;
        tracing::info!(
            down_ms = started.elapsed().as_millis() as u64,
            "shards reconnected: serving again"
        );
        let backend = Arc::new(backend);
        shared.set(State::Serving(backend.clone()));
        let wanted: Vec<_> = shared.preloads().values().cloned().collect();
        if !wanted.is_empty() {
            tokio::spawn(restore_preloads(backend, wanted));
        }
    }
}

/// Returns why `backend` can no longer serve.
async fn watch<S: ShardApi>(backend: &ShardBackend<S>, rc: &RecoveryConfig) -> String {
    let mut failures = 0;
    loop {
        tokio::select! {
            reason = backend.lost() => return reason,
            _ = tokio::time::sleep(rc.poll_interval) => {}
        }
        if backend.tasks_finished() {
            return "the batching loop stopped".into();
        }
        match backend.check(rc.health_timeout).await {
            Ok(()) => failures = 0,
            Err(Unhealthy::Restarted) => return Unhealthy::Restarted.to_string(),
            Err(Unhealthy::Failed(reason)) => {
                failures += 1;
                if failures >= rc.failures {
                    return reason;
                }
                tracing::warn!(reason, "shard health check failed");
            }
        }
    }
}

/// Tries until the shards answer and are set up again.
async fn reconnect<C: Connector>(
    connector: &C,
    config: &RouterConfig,
    rc: &RecoveryConfig,
) -> ShardBackend<C::Api> {
    /// How often a long wait is reported.
    const REPORT_EVERY: Duration = Duration::from_secs(30);
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(rc.retry_interval).await;
        let attempt = async {
            let client = connector.connect().await?;
            client.health().await?;
            ShardBackend::start(client, config).await
        };
        let error = match tokio::time::timeout(rc.setup_timeout, attempt).await {
            Ok(Ok(backend)) => return backend,
            Ok(Err(e)) => e,
            Err(_) => BackendError::Config(format!(
                "setting the shards up took over {} s",
                rc.setup_timeout.as_secs()
            )),
        };
        if last_report.elapsed() >= REPORT_EVERY {
            tracing::warn!(error = %error, "still waiting for the shards");
            last_report = Instant::now();
        } else {
            tracing::debug!(error = %error, "shards not back yet");
        }
    }
}

#[cfg(test)]
mod tests;
