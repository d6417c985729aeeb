//! The shard group while serving: notices a rank that died or stopped answering, and restarts
//! the whole group (`--shard-restart on-failure`), pausing longer each time it fails again
//! soon after a restart.
//!
//! A tensor-parallel group cannot lose one rank and go on (the others wait for it in every
//! collective), so a failure of any rank restarts every rank. The router notices the new
//! processes by itself (their health reports a new instance id), fails what the old ones held
//! and sets the new ones up; adapters load again on demand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::args::ShardRestart;
use super::probe::ReadinessProbe;
use super::supervisor::{ShardExit, Supervisor, SupervisorConfig, SupervisorError};

/// Metric names of the group.
mod names {
    pub const RESTARTS: &str = "medley_shard_restarts";
}

/// How the group is watched and restarted.
#[derive(Debug, Clone)]
pub struct GroupPolicy {
    /// What to do when the group fails.
    pub restart: ShardRestart,
    /// Time between two health checks of every rank.
    pub check_interval: Duration,
    /// Failed checks in a row that make a rank count as hung.
    pub failed_checks: u32,
    /// Pause before the second restart within [`GroupPolicy::stable_after`]; doubled for each
    /// further one, up to [`GroupPolicy::max_delay`]. The first restart is immediate.
    pub first_delay: Duration,
    /// Longest pause before a restart.
    pub max_delay: Duration,
    /// A group that ran this long counts as healthy: the pause starts over.
    pub stable_after: Duration,
    /// Restarted groups that fail to start, in a row, before the launcher gives up.
    pub max_failed_starts: u32,
}

impl GroupPolicy {
    /// The default timings with `restart`.
    pub fn new(restart: ShardRestart) -> Self {
        Self {
            restart,
            check_interval: Duration::from_secs(2),
            failed_checks: 3,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            max_failed_starts: 3,
        }
    }
}

/// Why the group stopped serving.
#[derive(Debug, Clone)]
pub enum GroupFailure {
    /// A rank exited.
    Exited(ShardExit),
    /// A rank stopped answering health checks (hung, or its group broke).
    Unresponsive {
        /// The rank.
        rank: usize,
        /// Failed checks in a row.
        checks: u32,
        /// Time between checks.
        interval: Duration,
    },
}

impl std::fmt::Display for GroupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(exit) => exit.fmt(f),
            Self::Unresponsive {
                rank,
                checks,
                interval,
            } => write!(
                f,
                "shard {rank} failed {checks} health checks in a row ({} ms apart): it hangs or its tensor-parallel group is broken",
                interval.as_millis()
            ),
        }
    }
}

/// The running group and what it takes to start it again.
pub struct Group {
    config: SupervisorConfig,
    supervisor: Option<Supervisor>,
    probe: Arc<dyn ReadinessProbe>,
    policy: GroupPolicy,
    started: Instant,
    delay: Duration,
    restarts: u64,
}

impl Group {
    /// Watches `supervisor`, whose shards are ready, started with `config`.
    pub fn new(
        supervisor: Supervisor,
        config: SupervisorConfig,
        probe: Arc<dyn ReadinessProbe>,
        policy: GroupPolicy,
    ) -> Self {
        Self {
            config,
            supervisor: Some(supervisor),
            probe,
            policy,
            started: Instant::now(),
            delay: Duration::ZERO,
            restarts: 0,
        }
    }

    /// What to do on failure.
    pub fn restart_mode(&self) -> ShardRestart {
        self.policy.restart
    }

    /// Resolves when a rank exits or stops answering. Cancel-safe (the count of failed checks
    /// starts over).
    pub async fn failed(&mut self) -> GroupFailure {
        let Some(supervisor) = self.supervisor.as_mut() else {
            return std::future::pending().await;
        };
        let sockets = supervisor.sockets().to_vec();
        tokio::select! {
            exit = supervisor.unexpected_exit() => GroupFailure::Exited(exit),
            failure = unresponsive(&sockets, self.probe.as_ref(), &self.policy) => failure,
        }
    }

    /// Kills the failed group and starts a new one, after a pause when the last one failed
    /// soon after it started; returns once every rank is ready. Gives up with the last start's
    /// error after [`GroupPolicy::max_failed_starts`] failed starts in a row. Cancel-safe: the
    /// group being started stays owned here, for [`Group::into_supervisor`].
    pub async fn restart(&mut self) -> Result<(), SupervisorError> {
        let mut failed_starts = 0;
        loop {
            self.kill().await;
            let delay = self.next_delay();
            if !delay.is_zero() {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "pausing before restarting the shards"
                );
                tokio::time::sleep(delay).await;
            }
            self.restarts += 1;
            metrics::counter!(names::RESTARTS).increment(1);
            tracing::warn!(
                restart = self.restarts,
                "restarting every shard of the group"
            );
            self.started = Instant::now();
            let supervisor = self
                .supervisor
                .insert(Supervisor::spawn(self.config.clone()).await?);
            match supervisor.wait_ready(self.probe.as_ref()).await {
                Ok(()) => {
                    tracing::info!(
                        restart = self.restarts,
                        elapsed_ms = self.started.elapsed().as_millis() as u64,
                        "shards restarted and ready"
                    );
                    return Ok(());
                }
                Err(e) => {
                    failed_starts += 1;
                    tracing::error!(error = %e, failed_starts, "the restarted shards did not start");
                    if failed_starts >= self.policy.max_failed_starts {
                        self.kill().await;
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The current supervisor (to stop it), if any.
    pub fn into_supervisor(self) -> Option<Supervisor> {
        self.supervisor
    }

    /// Stops the current group without a grace period: it failed, nothing in it is worth
    /// waiting for.
    async fn kill(&mut self) {
        if let Some(old) = self.supervisor.take() {
            old.kill_switch().cancel();
            old.shutdown().await;
        }
    }

    /// The pause before the next start (see [`GroupPolicy::first_delay`]).
    fn next_delay(&mut self) -> Duration {
        self.delay = if self.restarts == 0 || self.started.elapsed() >= self.policy.stable_after {
            Duration::ZERO
        } else if self.delay.is_zero() {
            self.policy.first_delay
        } else {
            (self.delay * 2).min(self.policy.max_delay)
        };
        self.delay
    }
}

/// Resolves when one rank has failed `policy.failed_checks` health checks in a row.
async fn unresponsive(
    sockets: &[PathBuf],
    probe: &dyn ReadinessProbe,
    policy: &GroupPolicy,
) -> GroupFailure {
    let mut misses = vec![0u32; sockets.len()];
    loop {
        tokio::time::sleep(policy.check_interval).await;
        for (rank, socket) in sockets.iter().enumerate() {
            if probe.is_ready(socket).await {
                misses[rank] = 0;
                continue;
            }
            misses[rank] += 1;
            tracing::warn!(rank, failed = misses[rank], "shard health check failed");
            if misses[rank] >= policy.failed_checks {
                return GroupFailure::Unresponsive {
                    rank,
                    checks: misses[rank],
                    interval: policy.check_interval,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_while_restarts_come_fast_and_start_over_once_stable() {
        let mut policy = GroupPolicy::new(ShardRestart::OnFailure);
        policy.first_delay = Duration::from_secs(1);
        policy.max_delay = Duration::from_secs(5);
        policy.stable_after = Duration::from_secs(3600);
        let tmp = tempfile::tempdir().expect("tmp");
        let mut group = Group {
            config: crate::supervisor::tests::config(tmp.path(), "ready", 1),
            supervisor: None,
            probe: Arc::new(crate::supervisor::tests::FileProbe),
            policy,
            started: Instant::now(),
            delay: Duration::ZERO,
            restarts: 0,
        };
        let mut delays = vec![];
        for _ in 0..6 {
            delays.push(group.next_delay().as_secs());
            group.restarts += 1;
        }
        // The first restart is immediate, then 1, 2, 4 s and at most 5 s.
        assert_eq!(delays, [0, 1, 2, 4, 5, 5]);
        group.policy.stable_after = Duration::ZERO;
        assert_eq!(group.next_delay(), Duration::ZERO);
    }
}
