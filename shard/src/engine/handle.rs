//! The engine thread and the async handle the gRPC server uses to reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::heap::{HeapTrimmer, TRIM_INTERVAL};
use super::types::{
    AdapterSlotInfo, Batch, CachedBatch, ShardInfo, StepResponse, WarmupParams, WarmupResult,
};
use super::{Engine, EngineError};
use crate::adapters::{InstallReport, SlotAdapter};
use crate::comm::Comm;

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Work for the engine thread.
enum Command {
    Info(Reply<ShardInfo>),
    Warmup(WarmupParams, Reply<WarmupResult>),
    Prefill(Batch, Vec<CachedBatch>, Reply<StepResponse>),
    Decode(Vec<CachedBatch>, Reply<StepResponse>),
    Filter(u64, Vec<u64>, Reply<Option<CachedBatch>>),
    Clear(Option<u64>, Reply<()>),
    ActiveSequences(Reply<usize>),
    InstallAdapter(u32, Box<SlotAdapter>, Reply<InstallReport>),
    OffloadAdapter(u32, Reply<u64>),
    ListAdapters(Reply<Vec<AdapterSlotInfo>>),
}

/// Cheap, clonable handle to the engine thread. Commands run one at a time, in order.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Cleared when the engine thread ends (returns or panics).
    running: Arc<AtomicBool>,
    /// The model's group, for health checks that must not wait behind a forward pass.
    comm: Arc<dyn Comm>,
}

/// Clears the running flag when the engine thread ends, however it ends.
struct RunningGuard(Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Settings of the engine thread itself.
#[derive(Debug, Clone, Copy)]
pub struct EngineThreadSettings {
    /// Shortest time between two heap trims (see `heap.rs`); `None` never trims.
    pub heap_trim_interval: Option<Duration>,
    /// After answering a step, run the kept batch's next decode step before the router asks
    /// for it ([`Engine::decode_ahead`]).
    pub decode_ahead: bool,
}

impl Default for EngineThreadSettings {
    fn default() -> Self {
        Self {
            heap_trim_interval: Some(TRIM_INTERVAL),
            decode_ahead: true,
        }
    }
}

impl EngineHandle {
    /// Moves `engine` onto its own thread with the default [`EngineThreadSettings`] and returns
    /// the handle plus the thread's join handle. The thread exits when every handle is dropped.
    pub fn spawn(engine: Engine) -> std::io::Result<(Self, JoinHandle<()>)> {
        Self::spawn_with(engine, EngineThreadSettings::default())
    }

    /// [`EngineHandle::spawn`] with explicit thread settings.
    pub fn spawn_with(
        engine: Engine,
        settings: EngineThreadSettings,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let comm = engine.comm();
        let running = Arc::new(AtomicBool::new(true));
        let guard = RunningGuard(running.clone());
        let join = std::thread::Builder::new()
            .name("medley-engine".into())
            .spawn(move || {
                let _guard = guard;
                run(engine, rx, settings)
            })?;
        Ok((Self { tx, running, comm }, join))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// See [`Engine::info`].
    pub async fn info(&self) -> Result<ShardInfo, EngineError> {
        self.call(Command::Info).await
    }

    /// The engine thread runs and its tensor-parallel group works. Answered here, not by the
    /// engine thread, so a long forward pass does not make the shard look dead.
    pub fn health(&self) -> Result<(), EngineError> {
        if !self.running.load(Ordering::Acquire) {
            return Err(EngineError::Stopped);
        }
        self.comm
            .check()
            .map_err(|e| EngineError::GroupBroken(e.to_string()))
    }

    /// See [`Engine::warmup`].
    pub async fn warmup(&self, req: WarmupParams) -> Result<WarmupResult, EngineError> {
        self.call(|r| Command::Warmup(req, r)).await
    }

    /// See [`Engine::prefill`].
    pub async fn prefill(
        &self,
        batch: Batch,
        running: Vec<CachedBatch>,
    ) -> Result<StepResponse, EngineError> {
        self.call(|r| Command::Prefill(batch, running, r)).await
    }

    /// See [`Engine::decode`].
    pub async fn decode(&self, batches: Vec<CachedBatch>) -> Result<StepResponse, EngineError> {
        self.call(|r| Command::Decode(batches, r)).await
    }

    /// See [`Engine::filter`].
    pub async fn filter(
        &self,
        batch_id: u64,
        ids: Vec<u64>,
    ) -> Result<Option<CachedBatch>, EngineError> {
        self.call(|r| Command::Filter(batch_id, ids, r)).await
    }

    /// See [`Engine::clear`].
    pub async fn clear(&self, id: Option<u64>) -> Result<(), EngineError> {
        self.call(|r| Command::Clear(id, r)).await
    }

    /// See [`Engine::active_sequences`].
    pub async fn active_sequences(&self) -> Result<usize, EngineError> {
        self.call(Command::ActiveSequences).await
    }

    /// See [`Engine::install_adapter`]; `adapter` was prepared off the engine thread.
    pub async fn install_adapter(
        &self,
        slot: u32,
        adapter: SlotAdapter,
    ) -> Result<InstallReport, EngineError> {
        self.call(|r| Command::InstallAdapter(slot, Box::new(adapter), r))
            .await
    }

    /// See [`Engine::offload_adapter`].
    pub async fn offload_adapter(&self, slot: u32) -> Result<u64, EngineError> {
        self.call(|r| Command::OffloadAdapter(slot, r)).await
    }

    /// See [`Engine::list_adapters`].
    pub async fn list_adapters(&self) -> Result<Vec<AdapterSlotInfo>, EngineError> {
        self.call(Command::ListAdapters).await
    }
}

fn run(mut engine: Engine, rx: mpsc::Receiver<Command>, settings: EngineThreadSettings) {
    let mut heap = settings.heap_trim_interval.map(HeapTrimmer::new);
    let comm = engine.comm();
    // A step that failed because the group broke says so (UNAVAILABLE: restart the group),
    // not as a model error.
    let step = |result: Result<StepResponse, EngineError>| match result {
        Err(EngineError::Model(m)) => Err(match comm.check() {
            Err(e) => EngineError::GroupBroken(format!("{e} ({m})")),
            Ok(()) => EngineError::Model(m),
        }),
        other => other,
    };
    while let Ok(cmd) = rx.recv() {
        // A send error only means the caller gave up waiting; the work is done either way.
        match cmd {
            Command::Info(r) => {
                let _ = r.send(Ok(engine.info()));
            }
            Command::Warmup(req, r) => {
                let _ = r.send(engine.warmup(&req));
            }
            Command::Prefill(batch, running, r) => {
                let _ = r.send(step(engine.prefill(batch, running)));
                if settings.decode_ahead {
                    engine.decode_ahead();
                }
            }
            Command::Decode(batches, r) => {
                let _ = r.send(step(engine.decode(batches)));
                if settings.decode_ahead {
                    engine.decode_ahead();
                }
            }
            Command::Filter(id, ids, r) => {
                let _ = r.send(engine.filter(id, &ids));
            }
            Command::Clear(id, r) => {
                engine.clear(id);
                let _ = r.send(Ok(()));
            }
            Command::ActiveSequences(r) => {
                let _ = r.send(Ok(engine.active_sequences()));
            }
            Command::InstallAdapter(slot, adapter, r) => {
                let _ = r.send(engine.install_adapter(slot, *adapter));
            }
            Command::OffloadAdapter(slot, r) => {
                let _ = r.send(engine.offload_adapter(slot));
            }
            Command::ListAdapters(r) => {
                let _ = r.send(Ok(engine.list_adapters()));
            }
        }
        // After the reply, so the trim delays no caller that is waiting for this command.
        if let Some(h) = heap.as_mut() {
            h.maybe_trim();
        }
    }
    tracing::info!("engine thread stopped");
}
