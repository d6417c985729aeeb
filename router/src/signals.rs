//! SIGINT / SIGTERM handling for the launcher. Handlers are installed once at start so a signal
//! during model download or shard startup also stops everything cleanly.

use futures::future::BoxFuture;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Which termination signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (Kubernetes, systemd, `docker stop`).
    Terminate,
}

impl std::fmt::Display for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Termination::Interrupt => "SIGINT",
            Termination::Terminate => "SIGTERM",
        })
    }
}

/// Listens for SIGINT and SIGTERM; every arrival is delivered once by [`ShutdownSignals::recv`].
#[derive(Debug)]
pub struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers (needs a Tokio runtime).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) -> Termination {
        tokio::select! {
            Some(()) = self.interrupt.recv() => Termination::Interrupt,
            Some(()) = self.terminate.recv() => Termination::Terminate,
            else => std::future::pending().await,
        }
    }
}

/// Where the launcher's stop requests come from: the real signals, or a channel in tests.
pub trait SignalSource: Send {
    /// Waits for the next stop request.
    fn next(&mut self) -> BoxFuture<'_, Termination>;
}

impl SignalSource for ShutdownSignals {
    fn next(&mut self) -> BoxFuture<'_, Termination> {
        Box::pin(self.recv())
    }
}

/// Stop requests sent through a channel; when every sender is gone, none ever arrives.
impl SignalSource for tokio::sync::mpsc::UnboundedReceiver<Termination> {
    fn next(&mut self) -> BoxFuture<'_, Termination> {
        Box::pin(async move {
            match self.recv().await {
                Some(signal) => signal,
                None => std::future::pending().await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Sends SIGINT then SIGTERM to this test process (the handlers replace the default
    /// action, and no other test of this binary listens for real signals).
    #[tokio::test]
    async fn real_signals_are_received() {
        let mut signals = ShutdownSignals::install().expect("install");
        for (flag, expected) in [
            ("-INT", Termination::Interrupt),
            ("-TERM", Termination::Terminate),
        ] {
            let status = std::process::Command::new("kill")
                .args([flag, &std::process::id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success());
            let got = tokio::time::timeout(Duration::from_secs(10), signals.next())
                .await
                .expect("signal delivered");
            assert_eq!(got, expected);
        }
    }
}
