//! Runs `medley serve` expected to fail at start-up, with a time limit.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest time a failing start may take (model resolution of the embedded model and the
/// shards' start).
const LIMIT: Duration = Duration::from_secs(120);

/// `medley serve ARGS` on the embedded model with private sockets and cache; returns its exit
/// status and everything it printed (the launcher logs to stdout, the shards to stderr; both go
/// to one file, so no pipe can fill). Panics if it is still running after [`LIMIT`].
pub fn serve_until_exit(args: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medley"))
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--grpc-port", "0"])
        .arg("--shard-uds-path")
        .arg(dir.path().join("s"))
        .env("HF_HOME", dir.path())
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .env_remove("MEDLEY_DEVICE")
        .env_remove("NUM_SHARD")
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start medley");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("medley serve {args:?} still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(!output.contains("panicked"), "{output}");
    (status, output)
}
