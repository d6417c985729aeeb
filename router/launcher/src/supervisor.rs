//! Runs the shard processes: spawn one per rank, forward their output, wait until each is ready,
//! report the first one that dies, and stop them (SIGTERM, then SIGKILL after a grace period).
//!
//! Each shard runs in its own process group, so a Ctrl-C in the terminal reaches only the
//! launcher, which then stops the router before the shards. On Linux a shard also gets SIGKILL
//! if the launcher dies (`PR_SET_PDEATHSIG`), so no shard outlives it.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use command::{ShardCommand, ShardKvFlags, ShardOtlp};

use super::probe::ReadinessProbe;
use super::shard_logs::{OutputTail, Stream, TailSnapshot, forward};
use medley_shard::comm::CommBackend;

/// Longest Unix socket path (`sun_path` is 108 bytes including the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Pause between readiness rounds.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the startup wait says what it is waiting for.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);
/// How long output forwarding may lag behind a shard's exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How to run the shards.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The command line.
    pub command: ShardCommand,
    /// Number of ranks.
    pub world_size: usize,
    /// Socket prefix: rank `r` listens on `{prefix}-{r}`.
    pub uds_prefix: PathBuf,
    /// Limit for every shard to become ready.
    pub startup_timeout: Duration,
    /// Time a shard gets between SIGTERM and SIGKILL.
    pub termination_timeout: Duration,
}

/// The socket path of `rank`: `{prefix}-{rank}`.
pub fn socket_path(prefix: &Path, rank: usize) -> PathBuf {
    let mut path = prefix.as_os_str().to_os_string();
    path.push(format!("-{rank}"));
    PathBuf::from(path)
}

/// How a shard ended.
#[derive(Debug, Clone)]
pub struct ShardExit {
    /// Its rank.
    pub rank: usize,
    /// Its exit status (`None` if it could not be collected).
    pub status: Option<ExitStatus>,
    /// The first error-looking line it printed and its last lines.
    pub output: TailSnapshot,
}

impl ShardExit {
    /// The exit status in words (`exit status: 3`, `signal: 9 (SIGKILL)`).
    pub fn status_text(&self) -> String {
        match self.status {
            Some(status) => status.to_string(),
            None => "status unknown".to_string(),
        }
    }
}

impl std::fmt::Display for ShardExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} exited ({})", self.rank, self.status_text())?;
        if let Some(error) = &self.output.first_error {
            write!(f, ": {error}")?;
        }
        if !self.output.lines.is_empty() {
            write!(f, "; its last output:")?;
            for line in &self.output.lines {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

/// Failures of the shard processes.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The executable could not be started.
    #[error("cannot start shard {rank} ({}): {source}", program.display())]
    Spawn {
        /// The rank.
        rank: usize,
        /// The executable.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket path cannot be prepared.
    #[error("socket {}: {source}", path.display())]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A live server already listens on a socket path.
    #[error(
        "another process is serving on {}: stop it or pass a different --shard-uds-path",
        .0.display()
    )]
    SocketInUse(PathBuf),
    /// The socket path does not fit in `sun_path`.
    #[error("socket path {} is longer than {MAX_SOCKET_PATH} bytes; pass a shorter --shard-uds-path", .0.display())]
    SocketPathTooLong(PathBuf),
    /// A shard exited before it was ready.
    #[error("{0} before it was ready")]
    ExitedDuringStartup(ShardExit),
    /// The group's NCCL unique id could not be created.
    #[error("cannot create the NCCL group id: {0}")]
    Nccl(String),
    /// Some shards were not ready in time.
    #[error("shard(s) {ranks:?} not ready after {}s (--shard-startup-timeout)", timeout.as_secs())]
    StartupTimeout {
        /// The ranks still not ready.
        ranks: Vec<usize>,
        /// The limit.
        timeout: Duration,
    },
}

/// The running shards.
#[derive(Debug)]
pub struct Supervisor {
    config: SupervisorConfig,
    sockets: Vec<PathBuf>,
    /// The group's shared-memory file for collectives (world size > 1, shared memory).
    comm_path: Option<PathBuf>,
    /// The group's NCCL unique id, hex (world size > 1, NCCL): new for every group start.
    nccl_id: Option<String>,
    tasks: Vec<JoinHandle<ShardExit>>,
    /// First unexpected exit, if any.
    exits: watch::Receiver<Option<ShardExit>>,
    stop: CancellationToken,
    kill: CancellationToken,
}

impl Supervisor {
    /// Removes stale sockets and starts every rank. On failure the ranks already started are
    /// stopped again.
    pub async fn spawn(config: SupervisorConfig) -> Result<Self, SupervisorError> {
        let sockets: Vec<PathBuf> = (0..config.world_size)
            .map(|rank| socket_path(&config.uds_prefix, rank))
            .collect();
        for path in &sockets {
            prepare_socket(path)?;
        }
        let backend = config
            .command
            .comm
            .resolve(config.command.device, config.world_size as u32)
            .map_err(SupervisorError::Nccl)?;
        let comm_path = (backend == CommBackend::Shm).then(|| comm_path_for(&config.uds_prefix));
        let nccl_id = if backend == CommBackend::Nccl && config.world_size > 1 {
            Some(new_nccl_id()?)
        } else {
            None
        };
        let (exit_tx, exits) = watch::channel(None);
        let mut supervisor = Self {
            config,
            sockets,
            comm_path,
            nccl_id,
            tasks: Vec::new(),
            exits,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
        };
        for rank in 0..supervisor.config.world_size {
            match supervisor.spawn_rank(rank, exit_tx.clone()) {
                Ok(task) => supervisor.tasks.push(task),
                Err(e) => {
                    supervisor.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(supervisor)
    }

    fn spawn_rank(
        &self,
        rank: usize,
        exit_tx: watch::Sender<Option<ShardExit>>,
    ) -> Result<JoinHandle<ShardExit>, SupervisorError> {
        let config = &self.config;
        let socket = &self.sockets[rank];
        let mut command = Command::new(&config.command.program);
        command
            .args(config.command.args(rank, config.world_size, socket))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", config.world_size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(id) = &self.nccl_id {
            command.env("MEDLEY_NCCL_ID", id);
        }
        if let Some(path) = &self.comm_path {
            command.env("MEDLEY_COMM_PATH", path);
            // Ranks share the machine's CPUs unless told otherwise.
            if std::env::var_os("MEDLEY_THREADS").is_none() {
                command.env(
                    "MEDLEY_THREADS",
                    threads_per_rank(config.world_size).to_string(),
                );
            }
        }
        die_with_launcher(&mut command);
        let mut child = command.spawn().map_err(|source| SupervisorError::Spawn {
            rank,
            program: config.command.program.clone(),
            source,
        })?;
        tracing::info!(rank, pid = child.id(), socket = %socket.display(), "shard started");
        let tail = OutputTail::default();
        let mut forwarders = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            forwarders.push(tokio::spawn(forward(
                out,
                rank,
                Stream::Stdout,
                tail.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward(
                err,
                rank,
                Stream::Stderr,
                tail.clone(),
            )));
        }
        let task = ShardTask {
            rank,
            child,
            forwarders,
            tail,
            stop: self.stop.clone(),
            kill: self.kill.clone(),
            grace: config.termination_timeout,
            exit_tx,
        };
        Ok(tokio::spawn(task.run()))
    }

    /// The socket of every rank, rank 0 first.
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// Cancelling this token makes a running [`Supervisor::shutdown`] kill the shards at once
    /// instead of waiting for the grace period (e.g. on a second Ctrl-C).
    pub fn kill_switch(&self) -> CancellationToken {
        self.kill.clone()
    }

    /// Waits until every shard answers `probe`. Fails as soon as one exits, or when the startup
    /// timeout passes. Does not stop the shards on failure (call [`Supervisor::shutdown`]).
    pub async fn wait_ready(&mut self, probe: &dyn ReadinessProbe) -> Result<(), SupervisorError> {
        let started = Instant::now();
        let deadline = started + self.config.startup_timeout;
        let mut next_progress = started + PROGRESS_INTERVAL;
        let mut pending: BTreeSet<usize> = (0..self.config.world_size).collect();
        loop {
            if let Some(exit) = self.exits.borrow().clone() {
                return Err(SupervisorError::ExitedDuringStartup(exit));
            }
            for rank in pending.clone() {
                if probe.is_ready(&self.sockets[rank]).await {
                    tracing::info!(
                        rank,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "shard ready"
                    );
                    pending.remove(&rank);
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SupervisorError::StartupTimeout {
                    ranks: pending.into_iter().collect(),
                    timeout: self.config.startup_timeout,
                });
            }
            if now >= next_progress {
                tracing::info!(ranks = ?pending, elapsed_s = started.elapsed().as_secs(), "waiting for shards");
                next_progress = now + PROGRESS_INTERVAL;
            }
            tokio::select! {
                _ = self.exits.changed() => {}
                _ = tokio::time::sleep(POLL_INTERVAL.min(deadline - now)) => {}
            }
        }
    }

    /// Resolves when a shard exits on its own (never during [`Supervisor::shutdown`]).
    /// Cancel-safe.
    pub async fn unexpected_exit(&mut self) -> ShardExit {
        // The watch guard must be gone before the (possibly endless) wait below.
        let exit = match self.exits.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone(),
            Err(_) => None,
        };
        match exit {
            Some(exit) => exit,
            // Every task is gone, which only a shutdown does: nothing more will exit.
            None => std::future::pending().await,
        }
    }

    /// Stops every shard (SIGTERM to its process group, SIGKILL after the termination timeout
    /// or when the kill switch fires), removes the sockets and returns how each ended.
    pub async fn shutdown(self) -> Vec<ShardExit> {
        self.stop.cancel();
        let mut exits = Vec::with_capacity(self.tasks.len());
        for (rank, task) in self.tasks.into_iter().enumerate() {
            match task.await {
                Ok(exit) => {
                    tracing::info!(rank, status = %exit.status_text(), "shard stopped");
                    exits.push(exit);
                }
                Err(e) => tracing::error!(rank, error = %e, "shard supervision task failed"),
            }
        }
        for path in &self.sockets {
            remove_socket_file(path);
        }
        // Rank 0 removes it once the group has formed; this covers a group that never did.
        if let Some(path) = &self.comm_path {
            let _ = std::fs::remove_file(path);
        }
        exits
    }
}

/// A fresh NCCL unique id for a group this launcher starts (its bootstrap listener runs in this
/// process until every rank has joined).
#[cfg(feature = "cuda")]
fn new_nccl_id() -> Result<String, SupervisorError> {
    medley_shard::comm::nccl::new_unique_id()
        .map(|id| medley_shard::comm::backend::nccl_id_to_hex(&id))
        .map_err(|e| SupervisorError::Nccl(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn new_nccl_id() -> Result<String, SupervisorError> {
    Err(SupervisorError::Nccl(
        "this launcher was built without the `cuda` feature".into(),
    ))
}

/// A fresh shared-memory file name for a group started by this launcher: on /dev/shm (a memory
/// file system) when there is one, else next to the sockets.
fn comm_path_for(uds_prefix: &Path) -> PathBuf {
    static GROUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = GROUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm
    } else {
        uds_prefix.parent().unwrap_or(Path::new("/tmp"))
    };
    dir.join(format!("medley-comm-{}-{n}", std::process::id()))
}

/// The forward-pass threads of each of `world` ranks: the CPUs this process may use, shared.
fn threads_per_rank(world: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / world.max(1)).max(1)
}

/// Makes sure `path` can be bound: creates its directory, removes a stale socket file, refuses
/// if a live server answers on it.
fn prepare_socket(path: &Path) -> Result<(), SupervisorError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(SupervisorError::SocketPathTooLong(path.to_path_buf()));
    }
    let io = |source| SupervisorError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
        Ok(meta) if meta.is_dir() => Err(io(std::io::Error::other("is a directory"))),
        Ok(meta) => {
            if meta.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok()
            {
                return Err(SupervisorError::SocketInUse(path.to_path_buf()));
            }
            tracing::info!(socket = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).map_err(io)
        }
    }
}

/// Best-effort removal after the shards stopped.
fn remove_socket_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "socket removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(socket = %path.display(), error = %e, "cannot remove socket"),
    }
}

/// Owns one shard process until it ends.
struct ShardTask {
    rank: usize,
    child: Child,
    forwarders: Vec<JoinHandle<()>>,
    tail: OutputTail,
    stop: CancellationToken,
    kill: CancellationToken,
    grace: Duration,
    exit_tx: watch::Sender<Option<ShardExit>>,
}

impl ShardTask {
    async fn run(mut self) -> ShardExit {
        let rank = self.rank;
        tokio::select! {
            status = self.child.wait() => {
                let exit = self.finish(status.ok()).await;
                tracing::error!(rank, status = %exit.status_text(), "shard exited unexpectedly");
                // Only the first death is reported; the others follow from it.
                self.exit_tx.send_if_modified(|first| {
                    if first.is_some() {
                        return false;
                    }
                    *first = Some(exit.clone());
                    true
                });
                return exit;
            }
            _ = self.stop.cancelled() => {}
        }
        signal_group(&self.child, libc::SIGTERM);
        let status = tokio::select! {
            status = self.child.wait() => status.ok(),
            _ = tokio::time::sleep(self.grace) => {
                tracing::warn!(rank, grace_s = self.grace.as_secs(), "shard did not stop in time: killing it");
                self.kill_now().await
            }
            _ = self.kill.cancelled() => {
                tracing::warn!(rank, "killing shard");
                self.kill_now().await
            }
        };
        self.finish(status).await
    }

    async fn kill_now(&mut self) -> Option<ExitStatus> {
        signal_group(&self.child, libc::SIGKILL);
        self.child.wait().await.ok()
    }

    /// Lets the forwarders drain what the shard wrote last, then reports.
    async fn finish(&mut self, status: Option<ExitStatus>) -> ShardExit {
        for forwarder in self.forwarders.drain(..) {
            let abort = forwarder.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, forwarder)
                .await
                .is_err()
            {
                // A grandchild may still hold the pipe open; stop reading it.
                abort.abort();
            }
        }
        ShardExit {
            rank: self.rank,
            status,
            output: self.tail.snapshot(),
        }
    }
}

/// Sends `signal` to the shard's process group (the shard and anything it started).
fn signal_group(child: &Child, signal: libc::c_int) {
    // `id()` is `None` once the child has been reaped; then there is nothing to signal, and
    // its pid may already belong to someone else.
    let Some(pid) = child.id().and_then(|id| libc::pid_t::try_from(id).ok()) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory. The child is not reaped yet
    // (`id()` is `Some`), so its pid, which is also its process group id (`process_group(0)`),
    // cannot have been reused.
    let rc = unsafe { libc::kill(-pid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        tracing::debug!(pid, signal, error = %err, "signalling the shard's process group failed");
    }
}

/// On Linux, asks the kernel to SIGKILL the shard when the launcher dies.
///
/// The kernel ties this to the *thread* that forked: shards must be spawned from a thread that
/// lives as long as the launcher (a Tokio worker or the main thread, never `spawn_blocking`).
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only calls the
    // async-signal-safe prctl(2) and getppid(2); it allocates nothing (errors come from errno).
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died between fork and prctl: do not run orphaned.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_command: &mut Command) {}

mod command;
#[cfg(test)]
pub(crate) mod tests;
