//! `medley`: the one-binary launcher on top of the router and the shard.
//!
//! * `medley serve` resolves the model, starts one shard process per rank (this executable's
//!   hidden `medley shard`, or `--shard-bin medley-shard`), waits until they answer, then runs
//!   the router (the `medley-router` library) until SIGINT/SIGTERM and stops everything in order.
//! * `medley merge` ([`merge`]) merges PEFT adapters offline with the shard's merge engine.
//!
//! This crate may link both sides; the router library itself links no model code.
//!
//! * [`cli`] / [`args`] — the command line (every flag also an environment variable).
//! * [`resolve`] — local directory → Hugging Face cache → hub download → embedded default,
//!   built on [`model_dir`] (layout checks), [`hub`] (cache + `hf-hub`) and [`embedded`].
//! * [`supervisor`] — shard processes, their logs ([`shard_logs`]), readiness ([`probe`]),
//!   SIGTERM/SIGKILL.
//! * [`group`] — the shard group while serving: health watch, restart with back-off.
//! * [`serve()`] — the whole sequence; [`signals`] and [`logging`] come from the router.
//!
//! # Exit codes of `medley serve`
//!
//! | code | meaning |
//! |---|---|
//! | 0 | stopped by SIGINT/SIGTERM (at any stage), everything shut down |
//! | 1 | the router failed (could not bind, lost the shards, ...) |
//! | 2 | invalid arguments (clap's own code, also used for inconsistent router limits and for `--device cuda` on a binary built without CUDA) |
//! | 3 | the model could not be resolved (missing files, not cached offline, download failed) |
//! | 4 | a shard could not be started, exited before it was ready, or was not ready in time |
//! | 5 | a shard died or hung while serving and was not restarted (`--shard-restart never`), or the restarted shards did not start |
//! | 6 | launcher I/O failure (installing signal handlers) |

pub use medley_hub as hub;
pub use medley_hub::model_dir;
pub use medley_router::{logging, signals};

pub mod args;
pub mod cli;
pub mod embedded;
pub mod group;
pub mod merge;
pub mod probe;
pub mod resolve;
pub mod serve;
pub mod shard_logs;
pub mod staged;
pub mod supervisor;

pub use args::ServeArgs;
pub use cli::{Cli, Command};
pub use serve::{run_router, serve, serve_with};

use group::GroupFailure;
use medley_router::config::ConfigError;
use resolve::ResolveError;
use supervisor::SupervisorError;

/// Boxed error of the router stage (its concrete errors belong to `server` and `backend`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything `medley serve` can fail with; [`LauncherError::exit_code`] maps it to the
/// process exit code.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// Router flags are inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No model to serve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// `--device` asks for a device kind this binary cannot drive.
    #[error(transparent)]
    Device(#[from] medley_shard::device::DeviceError),
    /// `--tp-comm` cannot run with this device, shard count or build.
    #[error("{0}")]
    Comm(String),
    /// The shard executable was not found.
    #[error("cannot find the shard executable: {0}")]
    ShardBinary(String),
    /// The shards did not start.
    #[error(transparent)]
    Startup(#[from] SupervisorError),
    /// A shard died or hung while serving, and the group was not restarted
    /// (`--shard-restart never`).
    #[error("{0}")]
    ShardDied(GroupFailure),
    /// A shard died or hung while serving, and the restarted group did not start.
    #[error("{failure}; restarting the shards failed: {error}")]
    RestartFailed {
        /// What happened first.
        failure: Box<GroupFailure>,
        /// Why the last restart failed.
        error: Box<SupervisorError>,
    },
    /// The router failed.
    #[error("router failed: {0}")]
    Router(BoxError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl LauncherError {
    /// The process exit code (see the table in the module docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            LauncherError::Router(_) => 1,
            LauncherError::Config(_) | LauncherError::Device(_) | LauncherError::Comm(_) => 2,
            LauncherError::Resolve(e) if e.is_argument_error() => 2,
            LauncherError::Resolve(_) => 3,
            LauncherError::ShardBinary(_) | LauncherError::Startup(_) => 4,
            LauncherError::ShardDied(_) | LauncherError::RestartFailed { .. } => 5,
            LauncherError::Signals(_) => 6,
        }
    }
}
