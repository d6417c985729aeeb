//! `medley serve --device cuda` where no GPU can be used fails at start-up with a clear error:
//! never a panic, never a hang. A CPU build says it was built without CUDA (exit code 2, before
//! the model is even resolved); a CUDA build on a machine without a usable GPU reports the shard's
//! "cannot open CUDA device" error (exit code 4). CI runs the CUDA build's variant against the
//! libcuda stub of scripts/cuda/env.sh with `MEDLEY_EXPECT_NO_GPU=1`; without that variable a CUDA
//! build skips it, since the machine may have a GPU and the server would then start.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest time the failing start may take (model resolution of the embedded model and one
/// shard start).
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_startup_error() {
    if cfg!(feature = "cuda") && std::env::var_os("MEDLEY_EXPECT_NO_GPU").is_none() {
        eprintln!("skipped: a CUDA build may find a GPU here (set MEDLEY_EXPECT_NO_GPU=1)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The launcher logs to stdout, the shards to stderr: both go to one file (no pipe to fill).
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medley"))
        .args([
            "serve",
            "--device",
            "cuda",
            "--port",
            "0",
            "--grpc-port",
            "0",
        ])
        .arg("--shard-uds-path")
        .arg(dir.path().join("s"))
        .env("HF_HOME", dir.path())
        .env_remove("MEDLEY_DEVICE")
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
            panic!("medley serve --device cuda still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(!output.contains("panicked"), "{output}");
    let (code, message) = if cfg!(feature = "cuda") {
        (
            4,
            "cannot open CUDA device 0 (rank 0): no CUDA-capable GPU is visible",
        )
    } else {
        (2, "built without CUDA support")
    };
    assert_eq!(status.code(), Some(code), "{output}");
    assert!(
        output.contains(message),
        "expected {message:?} in:\n{output}"
    );
}
