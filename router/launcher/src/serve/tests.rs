//! The `serve` sequence with the fake shard script, a fake router and signals from a channel.

use std::sync::Mutex;

use clap::Parser;
use tokio::sync::mpsc;

use super::*;
use crate::cli::{Cli, Command};
use crate::model_dir::testing::copy_fixture;
use crate::signals::Termination;
use crate::supervisor::tests::{FileProbe, fake_shard};

/// A plan serving `<tmp>/<mode>` (a copy of the fixture, so the fake shard runs in `mode`).
fn plan(tmp: &Path, mode: &str, extra: &[&str]) -> ServePlan {
    let model_dir = tmp.join(mode);
    copy_fixture(&model_dir);
    let model = model_dir.to_str().expect("utf8").to_string();
    let sockets = tmp.join("sock");
    let mut argv = vec![
        "medley".to_string(),
        "serve".into(),
        "--model".into(),
        model.clone(),
        "--shard-uds-path".into(),
        sockets.to_str().expect("utf8").into(),
        "--graceful-termination-timeout".into(),
        "5".into(),
        "--shard-startup-timeout".into(),
        "10".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("parse").command else {
        panic!("expected the serve subcommand");
    };
    let args = *args;
    ServePlan {
        resolve: ResolveRequest {
            model: Some(model),
            revision: None,
            gguf_file: None,
            hub: HubSettings::from_vars(Some(tmp.join("hub")), |_| None),
            embedded_bases: vec![tmp.join("embedded")],
            gguf_bases: vec![tmp.join("gguf")],
        },
        args: args.clone(),
        shard_bin: ShardProgram {
            path: fake_shard(),
            leading_args: vec![],
        },
        probe: Arc::new(FileProbe),
        group: GroupPolicy {
            check_interval: Duration::from_millis(50),
            failed_checks: 2,
            first_delay: Duration::from_millis(10),
            ..GroupPolicy::new(args.shard_restart)
        },
    }
}

/// What the fake router saw.
#[derive(Default)]
struct RouterLog {
    config: Option<RouterConfig>,
    stopped: bool,
}

/// A router that records its config and returns when asked to stop (or with `fail` at once).
fn fake_router(
    log: Arc<Mutex<RouterLog>>,
    fail: Option<&'static str>,
) -> impl FnOnce(RouterConfig, BoxFuture<'static, ()>) -> RouterFuture {
    move |config, shutdown| {
        Box::pin(async move {
            log.lock().expect("lock").config = Some(config);
            if let Some(message) = fail {
                return Err(message.into());
            }
            shutdown.await;
            log.lock().expect("lock").stopped = true;
            Ok(())
        })
    }
}

fn args_written(tmp: &Path, mode: &str) -> bool {
    tmp.join(mode).join("args-0").exists()
}

#[tokio::test]
async fn signal_stops_router_then_shards() {
    let tmp = tempfile::tempdir().expect("tmp");
    let plan = plan(
        tmp.path(),
        "ready",
        &["--num-shard", "2", "--port", "18123"],
    );
    let model_dir = tmp.path().join("ready");
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    let run = tokio::spawn(serve_with(plan, rx, fake_router(log.clone(), None)));
    // Wait until the router runs, then ask to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while log.lock().expect("lock").config.is_none() {
        assert!(std::time::Instant::now() < deadline, "router never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_with_a_signal(&tx, run).await;
    let log = log.lock().expect("lock");
    assert!(log.stopped, "router was not asked to stop");
    let config = log.config.as_ref().expect("config");
    assert_eq!(config.model_id, model_dir.to_str().expect("utf8"));
    assert_eq!(config.tokenizer_path, model_dir.join("tokenizer.json"));
    assert_eq!(config.http_addr.port(), 18123);
    let expected: Vec<PathBuf> = (0..2)
        .map(|r| socket_path(&tmp.path().join("sock"), r))
        .collect();
    assert_eq!(config.shard_uds_paths, expected);
    assert!(expected.iter().all(|s| !s.exists()), "sockets left behind");
}

/// Sends SIGTERM's stand-in and requires `run` to end well within 20 s.
async fn stop_with_a_signal(
    tx: &mpsc::UnboundedSender<Termination>,
    run: tokio::task::JoinHandle<Result<(), LauncherError>>,
) {
    tx.send(Termination::Terminate).expect("send");
    let result = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("stops")
        .expect("join");
    assert!(result.is_ok(), "{result:?}");
}

/// Lines in `<tmp>/<mode>/runs-<rank>`: how often that rank was started.
fn runs(tmp: &Path, mode: &str, rank: usize) -> usize {
    std::fs::read_to_string(tmp.join(mode).join(format!("runs-{rank}")))
        .map_or(0, |s| s.lines().count())
}

/// Serves `mode` with `extra` flags until every rank has run `starts` times, then checks the
/// router was never stopped and stops with a signal.
async fn restarted(mode: &str, extra: &[&str], starts: usize) {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    let run = tokio::spawn(serve_with(
        plan(tmp.path(), mode, extra),
        rx,
        fake_router(log.clone(), None),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (0..2).any(|rank| runs(tmp.path(), mode, rank) < starts) {
        assert!(
            std::time::Instant::now() < deadline,
            "the shards were not restarted"
        );
        assert!(!run.is_finished(), "serve ended: {:?}", run.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settled: the restarted group stays up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(runs(tmp.path(), mode, 0), starts);
    assert!(!log.lock().expect("lock").stopped, "the router was stopped");
    stop_with_a_signal(&tx, run).await;
    assert!(log.lock().expect("lock").stopped);
}

#[tokio::test]
async fn a_dead_shard_restarts_the_group_while_the_router_runs() {
    restarted("dieonce", &["--num-shard", "2"], 2).await;
}

#[tokio::test]
async fn a_hung_shard_restarts_the_group() {
    restarted("hangonce", &["--num-shard", "2"], 2).await;
}

/// Serves `mode` with `extra` flags and no signals; returns the error it must end with and what
/// the router saw.
async fn serve_failing(
    tmp: &Path,
    mode: &str,
    extra: &[&str],
) -> (LauncherError, Arc<Mutex<RouterLog>>) {
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = serve_with(plan(tmp, mode, extra), rx, fake_router(log.clone(), None))
        .await
        .expect_err("serve must fail");
    (err, log)
}

#[tokio::test]
async fn restarting_gives_up_when_the_new_group_cannot_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (err, log) = serve_failing(tmp.path(), "dieoncethenfail", &[]).await;
    assert_eq!(err.exit_code(), 5, "{err}");
    let text = err.to_string();
    assert!(text.contains("shard 0 exited"), "{text}");
    assert!(text.contains("cannot start"), "{text}");
    // The first run, then three failed starts.
    assert_eq!(runs(tmp.path(), "dieoncethenfail", 0), 4);
    assert!(log.lock().expect("lock").stopped, "router kept running");
}

#[tokio::test]
async fn shard_death_while_serving_exits_5_without_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (err, log) = serve_failing(tmp.path(), "die7", &["--shard-restart", "never"]).await;
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(err.to_string().contains("shard 0 exited"), "{err}");
    assert!(log.lock().expect("lock").stopped, "router kept running");
}

#[tokio::test]
async fn shard_startup_failure_exits_4_without_router() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (err, log) = serve_failing(tmp.path(), "fail3", &[]).await;
    assert_eq!(err.exit_code(), 4, "{err}");
    assert!(err.to_string().contains("boom"), "{err}");
    assert!(log.lock().expect("lock").config.is_none());
}

#[tokio::test]
async fn router_failure_exits_1_and_stops_shards() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (_tx, rx) = mpsc::unbounded_channel();
    let err = serve_with(
        plan(tmp.path(), "ready", &[]),
        rx,
        fake_router(log, Some("address in use")),
    )
    .await
    .expect_err("router failed");
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("address in use"), "{err}");
    assert!(!socket_path(&tmp.path().join("sock"), 0).exists());
}

#[tokio::test]
async fn bad_limits_exit_2_before_any_shard() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (_tx, rx) = mpsc::unbounded_channel();
    let plan = plan(
        tmp.path(),
        "ready",
        &["--max-input-length", "4096", "--max-total-tokens", "100"],
    );
    let err = serve_with(plan, rx, fake_router(log, None))
        .await
        .expect_err("invalid");
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(!args_written(tmp.path(), "ready"), "a shard was started");
}

#[tokio::test]
async fn unresolvable_model_exits_3() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut plan = plan(tmp.path(), "ready", &[]);
    std::fs::remove_file(tmp.path().join("ready/config.json")).expect("rm");
    plan.resolve.hub.offline = true;
    let (_tx, rx) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let err = serve_with(plan, rx, fake_router(log, None))
        .await
        .expect_err("incomplete model");
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[tokio::test]
async fn signal_during_startup_stops_cleanly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = Arc::new(Mutex::new(RouterLog::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    let run = tokio::spawn(serve_with(
        plan(tmp.path(), "never", &[]),
        rx,
        fake_router(log.clone(), None),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !args_written(tmp.path(), "never") {
        assert!(std::time::Instant::now() < deadline, "shard never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(Termination::Interrupt).expect("send");
    let result = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("stops")
        .expect("join");
    assert!(result.is_ok(), "{result:?}");
    assert!(log.lock().expect("lock").config.is_none());
}

#[test]
fn shard_binary_lookup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = fake_shard();
    assert_eq!(
        find_shard_binary(Some(&script)).expect("explicit").path,
        script
    );
    assert!(
        find_shard_binary(Some(&script))
            .expect("explicit")
            .leading_args
            .is_empty()
    );
    let own = find_shard_binary(None).expect("self");
    assert_eq!(own.leading_args, vec![std::ffi::OsString::from("shard")]);
    assert_eq!(own.path, std::env::current_exe().expect("exe"));
    let err = find_shard_binary(Some(&tmp.path().join("nope"))).expect_err("missing");
    assert_eq!(err.exit_code(), 4);
    assert!(err.to_string().contains("nope"), "{err}");
    let plain = tmp.path().join("not-executable");
    std::fs::write(&plain, b"").expect("write");
    assert!(find_shard_binary(Some(&plain)).is_err());
    let dirs = vec![
        tmp.path().to_path_buf(),
        script.parent().expect("dir").to_path_buf(),
    ];
    assert_eq!(
        find_in_dirs(&dirs, Path::new(SHARD_BIN_NAME)),
        Some(script.clone())
    );
    assert_eq!(find_in_dirs(&dirs, Path::new("not-executable")), None);
}
