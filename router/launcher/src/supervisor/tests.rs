//! Supervisor tests with a fake shard: a shell script whose behaviour is picked by `--model-id`.

use medley_shard::model::quant::Quantize;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::OnceLock;

use futures::future::BoxFuture;
use medley_shard::comm::CommKind;
use medley_shard::device::DeviceSpec;

use super::*;
use crate::args::DType;

/// The fake `medley-shard`. Its mode is the last component of `--model-dir`:
/// `ready` creates its socket at once; `late` after 0.4 s; `never` never; `fail3` prints to
/// stderr and exits 3; `json` logs one JSON error line and exits 1; `die7` becomes ready then
/// exits 7 after 0.5 s; `stubborn` ignores SIGTERM; `rank1fails` exits 4 on rank 1 only.
/// On their first run (no `<model-dir>/ran-<rank>` yet) `dieonce` becomes ready and exits 7
/// after 0.3 s, `hangonce` becomes ready and stops answering (removes its socket) after 0.3 s,
/// `dieoncethenfail` is like `dieonce`; later runs of `dieonce` and `hangonce` are ready, of
/// `dieoncethenfail` exit 3 at once.
/// Every run records its rank, world size and arguments in `<model-dir>/args-<rank>` and
/// appends a line to `<model-dir>/runs-<rank>`.
const FAKE_SHARD: &str = r#"#!/bin/sh
ALL="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --uds-path) SOCK="$2"; shift 2 ;;
    --model-dir) DIR="$2"; shift 2 ;;
    *) shift ;;
  esac
done
MODE="${DIR##*/}"
echo "$RANK $WORLD_SIZE $ALL" > "$DIR/args-$RANK"
echo run >> "$DIR/runs-$RANK"
FIRST=1
if [ -e "$DIR/ran-$RANK" ]; then FIRST=0; fi
touch "$DIR/ran-$RANK"
case "$MODE" in
  ready) touch "$SOCK"; exec sleep 60 ;;
  late) sleep 0.4; touch "$SOCK"; exec sleep 60 ;;
  never) exec sleep 60 ;;
  fail3) echo "loading weights"; echo "error: boom" >&2; exit 3 ;;
  json) echo '{"level":"ERROR","fields":{"message":"bad weights"},"target":"medley_shard"}'; exit 1 ;;
  die7) touch "$SOCK"; sleep 0.5; exit 7 ;;
  stubborn) trap '' TERM; touch "$SOCK"; while :; do sleep 0.1; done ;;
  rank1fails) if [ "$RANK" = 1 ]; then exit 4; fi; touch "$SOCK"; exec sleep 60 ;;
  dieonce) touch "$SOCK"; if [ $FIRST = 1 ]; then sleep 0.3; exit 7; fi; exec sleep 60 ;;
  hangonce) touch "$SOCK"; if [ $FIRST = 1 ]; then sleep 0.3; rm -f "$SOCK"; fi; exec sleep 60 ;;
  dieoncethenfail) if [ $FIRST = 0 ]; then echo "error: cannot start" >&2; exit 3; fi; touch "$SOCK"; sleep 0.3; exit 7 ;;
  *) echo "unknown mode $MODE" >&2; exit 99 ;;
esac
"#;

/// Path of the fake shard: `<tmp>/medley-fake-shard-<hash of the script>/medley-shard`, written
/// once (atomically, by rename) and reused by later runs, so test runs leave no litter behind.
pub(crate) fn fake_shard() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        use sha2::Digest;
        let hash = hex::encode(&sha2::Sha256::digest(FAKE_SHARD)[..8]);
        let dir = std::env::temp_dir().join(format!("medley-fake-shard-{hash}"));
        let path = dir.join("medley-shard");
        if std::fs::read(&path).is_ok_and(|b| b == FAKE_SHARD.as_bytes()) {
            return path;
        }
        std::fs::create_dir_all(&dir).expect("mkdir");
        let staged = tempfile::NamedTempFile::new_in(&dir).expect("tmp file");
        std::fs::write(staged.path(), FAKE_SHARD).expect("write script");
        std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        staged.persist(&path).expect("rename into place");
        path
    })
    .clone()
}

/// Ready as soon as the socket file exists (the fake shard cannot speak gRPC).
pub(crate) struct FileProbe;

impl ReadinessProbe for FileProbe {
    fn is_ready<'a>(&'a self, uds_path: &'a Path) -> BoxFuture<'a, bool> {
        Box::pin(async move { uds_path.exists() })
    }
}

/// Runs the fake shard in `mode`, its model dir being `<dir>/<mode>` (created).
pub(crate) fn config(dir: &Path, mode: &str, world_size: usize) -> SupervisorConfig {
    let model_dir = dir.join(mode);
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    SupervisorConfig {
        command: ShardCommand {
            program_args: vec![],
            program: fake_shard(),
            model_dir,
            model_id: "org/fake".to_string(),
            device: DeviceSpec::Cpu,
            comm: CommKind::Auto,
            dtype: DType::F32,
            quantize: Quantize::Auto,
            kv: ShardKvFlags {
                tokens: Some(64),
                gpu_memory_utilization: None,
                block_size: Some(8),
                prefix_caching: Some(medley_shard::cli::Switch::Off),
                cuda_graphs: None,
            },
            adapter_roots: vec![],
            builtin_adapters: vec![],
            adapter_memory_budget: None,
            max_adapter_slots: None,
            huggingface_hub_cache: None,
            otlp: None,
        },
        world_size,
        uds_prefix: dir.join("sock"),
        startup_timeout: Duration::from_secs(10),
        termination_timeout: Duration::from_secs(5),
    }
}

/// `Supervisor::spawn`, retrying `ETXTBSY`: another test thread may fork while the script's
/// write descriptor is open, and its child keeps that descriptor until it execs.
pub(crate) async fn spawn(config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
    let mut tries = 0;
    loop {
        match Supervisor::spawn(config.clone()).await {
            Err(SupervisorError::Spawn { source, .. })
                if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[test]
fn command_line() {
    let command = ShardCommand {
        program_args: vec![],
        program: "medley-shard".into(),
        model_dir: "/m".into(),
        model_id: "org/name".into(),
        device: DeviceSpec::Cuda { first: 0 },
        comm: CommKind::Auto,
        dtype: DType::Bf16,
        quantize: Quantize::Keep,
        kv: ShardKvFlags::default(),
        adapter_roots: vec![],
        builtin_adapters: vec![],
        adapter_memory_budget: None,
        max_adapter_slots: None,
        huggingface_hub_cache: None,
        otlp: None,
    };
    let args: Vec<String> = command
        .args(1, 2, Path::new("/tmp/s-1"))
        .into_iter()
        .map(|a| a.into_string().expect("utf8"))
        .collect();
    assert_eq!(
        args.join(" "),
        "--model-dir /m --uds-path /tmp/s-1 --rank 1 --world-size 2 --device cuda --comm auto \
         --dtype bf16 --quantize keep --model-id org/name --json-output"
    );
    let with_adapters = ShardCommand {
        adapter_roots: vec!["/a".into(), "/b".into()],
        builtin_adapters: vec![medley_shard::adapters::BuiltinAdapter {
            id: "medley-demo/sql".into(),
            dir: "/m/adapters/sql".into(),
        }],
        adapter_memory_budget: Some(1 << 30),
        max_adapter_slots: Some(8),
        huggingface_hub_cache: None,
        ..command.clone()
    };
    let args: Vec<String> = with_adapters
        .args(0, 1, Path::new("/s"))
        .into_iter()
        .map(|a| a.into_string().expect("utf8"))
        .collect();
    assert!(
        args.join(" ").ends_with(
            "--adapter-root /a --adapter-root /b --builtin-adapter medley-demo/sql=/m/adapters/sql \
             --adapter-memory-budget 1073741824 \
             --max-adapter-slots 8 --json-output"
        ),
        "{args:?}"
    );
    let with_otlp = ShardCommand {
        otlp: Some(ShardOtlp {
            endpoint: "http://collector:4317".into(),
            service_name: "medley-shard".into(),
        }),
        ..command.clone()
    };
    let args: Vec<String> = with_otlp
        .args(1, 2, Path::new("/s"))
        .into_iter()
        .map(|a| a.into_string().expect("utf8"))
        .collect();
    assert!(
        args.join(" ").ends_with(
            "--otlp-endpoint http://collector:4317 --otlp-service-name medley-shard --json-output"
        ),
        "{args:?}"
    );
    let with_kv = ShardCommand {
        program_args: vec![],
        kv: ShardKvFlags {
            tokens: Some(4096),
            gpu_memory_utilization: Some(0.75),
            cuda_graphs: Some(medley_shard::cli::Switch::On),
            ..Default::default()
        },
        ..command
    };
    let args = with_kv.args(0, 1, Path::new("/s"));
    let value = |flag: &str| {
        let pos = args.iter().position(|a| a == flag).expect(flag);
        args[pos + 1].clone()
    };
    assert_eq!(value("--kv-cache-tokens"), "4096");
    assert_eq!(value("--gpu-memory-utilization"), "0.75");
    assert_eq!(value("--cuda-graphs"), "on");
    assert_eq!(
        socket_path(Path::new("/tmp/medley-server"), 3),
        PathBuf::from("/tmp/medley-server-3")
    );
}

/// Without the `cuda` feature there is no NCCL: a group that asks for it is refused before any
/// rank starts.
#[cfg(not(feature = "cuda"))]
#[tokio::test]
async fn nccl_is_refused_without_cuda() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = config(tmp.path(), "ready", 2);
    cfg.command.device = DeviceSpec::Cuda { first: 0 };
    cfg.command.comm = CommKind::Nccl;
    match spawn(cfg).await {
        Err(SupervisorError::Nccl(m)) => assert!(m.contains("`cuda` feature"), "{m}"),
        other => panic!("expected the NCCL refusal, got {other:?}"),
    }
    assert!(!tmp.path().join("sock-0").exists());
}

#[tokio::test]
async fn late_sockets_become_ready_and_shutdown_cleans_up() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut sup = spawn(config(tmp.path(), "late", 2)).await.expect("spawn");
    let started = std::time::Instant::now();
    sup.wait_ready(&FileProbe).await.expect("ready");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "ready before the socket existed"
    );
    let sockets = sup.sockets().to_vec();
    assert!(sockets.iter().all(|s| s.exists()));
    for (rank, socket) in sockets.iter().enumerate() {
        let recorded =
            std::fs::read_to_string(tmp.path().join("late").join(format!("args-{rank}")))
                .expect("args");
        assert!(recorded.starts_with(&format!("{rank} 2 ")), "{recorded}");
        assert!(
            recorded.contains(&format!("--rank {rank} --world-size 2")),
            "{recorded}"
        );
        assert!(
            recorded.contains(&format!("--uds-path {}", socket.display())),
            "{recorded}"
        );
        assert!(recorded.contains("--kv-cache-tokens 64"), "{recorded}");
    }
    let exits = sup.shutdown().await;
    assert_eq!(exits.len(), 2);
    for exit in &exits {
        // `exec sleep` received the SIGTERM itself.
        assert_eq!(
            exit.status.and_then(|s| s.signal()),
            Some(libc::SIGTERM),
            "{exit}"
        );
    }
    assert!(sockets.iter().all(|s| !s.exists()), "sockets left behind");
}

#[tokio::test]
async fn early_exit_is_reported_with_status_and_output() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut sup = spawn(config(tmp.path(), "fail3", 1)).await.expect("spawn");
    let err = sup.wait_ready(&FileProbe).await.expect_err("exits");
    match &err {
        SupervisorError::ExitedDuringStartup(exit) => {
            assert_eq!(exit.rank, 0);
            assert_eq!(exit.status.and_then(|s| s.code()), Some(3));
            assert!(
                exit.output.lines.contains(&"error: boom".to_string()),
                "{exit}"
            );
            assert_eq!(exit.output.first_error.as_deref(), Some("error: boom"));
        }
        other => panic!("expected an early exit, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("shard 0 exited") && msg.contains("3") && msg.contains("boom"),
        "{msg}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn json_logs_are_parsed_into_the_tail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut sup = spawn(config(tmp.path(), "json", 1)).await.expect("spawn");
    let err = sup.wait_ready(&FileProbe).await.expect_err("exits");
    assert!(err.to_string().contains("ERROR bad weights"), "{err}");
    sup.shutdown().await;
}

#[tokio::test]
async fn one_failing_rank_fails_the_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut sup = spawn(config(tmp.path(), "rank1fails", 2))
        .await
        .expect("spawn");
    match sup.wait_ready(&FileProbe).await {
        Err(SupervisorError::ExitedDuringStartup(exit)) => {
            assert_eq!(exit.rank, 1);
            assert_eq!(exit.status.and_then(|s| s.code()), Some(4));
        }
        other => panic!("expected rank 1 to fail, got {other:?}"),
    }
    let exits = sup.shutdown().await;
    // Rank 0 was healthy and is stopped by the shutdown.
    assert_eq!(
        exits[0].status.and_then(|s| s.signal()),
        Some(libc::SIGTERM)
    );
}

#[tokio::test]
async fn startup_timeout_names_the_ranks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = config(tmp.path(), "never", 2);
    cfg.startup_timeout = Duration::from_millis(500);
    let mut sup = spawn(cfg).await.expect("spawn");
    match sup.wait_ready(&FileProbe).await {
        Err(SupervisorError::StartupTimeout { ranks, .. }) => assert_eq!(ranks, vec![0, 1]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    sup.shutdown().await;
}

#[tokio::test]
async fn death_while_serving_is_reported_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut sup = spawn(config(tmp.path(), "die7", 1)).await.expect("spawn");
    sup.wait_ready(&FileProbe).await.expect("ready");
    let exit = tokio::time::timeout(Duration::from_secs(10), sup.unexpected_exit())
        .await
        .expect("the shard dies within 0.5 s");
    assert_eq!(exit.rank, 0);
    assert_eq!(exit.status.and_then(|s| s.code()), Some(7));
    let exits = sup.shutdown().await;
    assert_eq!(exits[0].status.and_then(|s| s.code()), Some(7));
}

#[tokio::test]
async fn stubborn_shard_is_killed_after_the_grace_period() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = config(tmp.path(), "stubborn", 1);
    cfg.termination_timeout = Duration::from_millis(300);
    let mut sup = spawn(cfg).await.expect("spawn");
    sup.wait_ready(&FileProbe).await.expect("ready");
    let started = std::time::Instant::now();
    let exits = tokio::time::timeout(Duration::from_secs(10), sup.shutdown())
        .await
        .expect("shutdown is bounded");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "killed before the grace period"
    );
    assert_eq!(
        exits[0].status.and_then(|s| s.signal()),
        Some(libc::SIGKILL)
    );
}

#[tokio::test]
async fn kill_switch_skips_the_grace_period() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = config(tmp.path(), "stubborn", 1);
    cfg.termination_timeout = Duration::from_secs(60);
    let mut sup = spawn(cfg).await.expect("spawn");
    sup.wait_ready(&FileProbe).await.expect("ready");
    let kill = sup.kill_switch();
    let shutdown = tokio::spawn(sup.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill.cancel();
    let exits = tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("killed promptly")
        .expect("join");
    assert_eq!(
        exits[0].status.and_then(|s| s.signal()),
        Some(libc::SIGKILL)
    );
}

#[tokio::test]
async fn stale_socket_is_removed_live_one_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = config(tmp.path(), "ready", 1);
    let stale = socket_path(&cfg.uds_prefix, 0);
    // A socket file nobody listens on (bound, then the listener dropped).
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let mut sup = spawn(cfg.clone()).await.expect("stale socket replaced");
    sup.wait_ready(&FileProbe).await.expect("ready");
    sup.shutdown().await;
    assert!(!stale.exists());

    let _live = std::os::unix::net::UnixListener::bind(&stale).expect("bind");
    match spawn(cfg).await {
        Err(SupervisorError::SocketInUse(path)) => assert_eq!(path, stale),
        other => panic!("expected SocketInUse, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_program_and_long_paths_are_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = config(tmp.path(), "ready", 1);
    cfg.command.program = tmp.path().join("no-such-shard");
    let err = spawn(cfg).await.expect_err("missing program");
    assert!(
        matches!(err, SupervisorError::Spawn { rank: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-shard"), "{err}");

    let mut cfg = config(tmp.path(), "ready", 1);
    cfg.uds_prefix = tmp.path().join("x".repeat(120));
    assert!(matches!(
        spawn(cfg).await,
        Err(SupervisorError::SocketPathTooLong(_))
    ));
}
