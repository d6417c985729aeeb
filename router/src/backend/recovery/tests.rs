//! The recovery monitor over the in-memory [`FakeShard`]: crashes fail what the shards held
//! with UNAVAILABLE, health turns red, and the backend serves again once the shards are back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use medley_spec::Strategy;

use super::*;
use crate::backend::adapters::AdapterState;
use crate::backend::testing::{FakeAdapter, FakeShard, FakeShardConfig, merge, request, single};
use crate::infer::AdapterSpec;
use crate::infer::testing::{test_config, test_limits};

/// Connects to the fake shard while its process runs.
struct FakeConnector(FakeShard);

impl Connector for FakeConnector {
    type Api = FakeShard;

    async fn connect(&self) -> Result<FakeShard, ClientError> {
        self.0.health().await?;
        Ok(self.0.clone())
    }
}

fn fast() -> RecoveryConfig {
    RecoveryConfig {
        poll_interval: Duration::from_millis(20),
        failures: 2,
        health_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(20),
        setup_timeout: Duration::from_secs(5),
    }
}

fn fake_shard(step_ms: u64) -> FakeShard {
    FakeShard::new(FakeShardConfig {
        slots: 4,
        budget: 1000,
        step_delay: Duration::from_millis(step_ms),
        adapters: ["a", "b"]
            .into_iter()
            .map(|n| (n.to_string(), FakeAdapter::new(10, 8)))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    })
}

async fn recovering(shard: &FakeShard) -> RecoveringBackend<FakeConnector> {
    let config = test_config(test_limits(), PathBuf::new());
    let backend = ShardBackend::start(shard.clone(), &config)
        .await
        .expect("backend starts");
    RecoveringBackend::new(backend, FakeConnector(shard.clone()), config, fast())
}

/// Starts a request; returns its event channel.
fn start(
    backend: &RecoveringBackend<FakeConnector>,
    adapter: AdapterSpec,
    max_new: u32,
) -> UnboundedReceiver<Result<InferStreamResponse, InferError>> {
    backend
        .schedule(request(adapter, 4, max_new))
        .expect("scheduled")
}

/// Reads a request's events to its end: the tokens it got, and its text or error.
async fn finish(
    mut rx: UnboundedReceiver<Result<InferStreamResponse, InferError>>,
) -> (usize, Result<String, InferError>) {
    let mut tokens = 0;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = rx.recv().await {
            match event {
                Ok(InferStreamResponse::End { generated_text, .. }) => {
                    return Ok(generated_text.text);
                }
                Ok(_) => tokens += 1,
                Err(e) => return Err(e),
            }
        }
        Err(InferError::IncompleteGeneration)
    })
    .await
    .expect("the request ended within 10 s");
    (tokens, outcome)
}

async fn until_health(backend: &RecoveringBackend<FakeConnector>, healthy: bool) -> Duration {
    let t0 = Instant::now();
    while backend.health().await != healthy {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "health never became {healthy}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

fn is_unavailable(result: &Result<String, InferError>) -> bool {
    matches!(result, Err(InferError::Unavailable(_)))
}

#[tokio::test]
async fn a_crash_fails_what_ran_and_serving_resumes_after_the_restart() {
    let shard = fake_shard(5);
    let backend = recovering(&shard).await;
    // Warm an adapter so the new process must load it again.
    assert!(finish(start(&backend, single("a"), 2)).await.1.is_ok());
    assert_eq!(shard.load_labels(), ["a"]);

    // Long requests (base, adapter, merge) and one waiting for a held adapter load.
    shard.hold("b");
    let running: Vec<_> = [
        AdapterSpec::Base,
        single("a"),
        merge(&["a", "b"], Strategy::Ties),
    ]
    .into_iter()
    .map(|spec| start(&backend, spec, 1000))
    .collect();
    let waiting = start(&backend, single("b"), 4);
    tokio::time::sleep(Duration::from_millis(50)).await;
    shard.crash();
    let t0 = Instant::now();
    for rx in running.into_iter().chain([waiting]) {
        let (_, result) = finish(rx).await;
        assert!(is_unavailable(&result), "{result:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    until_health(&backend, false).await;
    let refused = backend
        .schedule(request(AdapterSpec::Base, 4, 2))
        .expect_err("refused while the shards are down");
    assert!(
        matches!(&refused, InferError::Unavailable(m) if m.contains("restarting")),
        "{refused}"
    );

    shard.release("b");
    shard.restart();
    until_health(&backend, true).await;
    for spec in [
        AdapterSpec::Base,
        single("a"),
        merge(&["a", "b"], Strategy::Ties),
    ] {
        let (tokens, result) = finish(start(&backend, spec.clone(), 3)).await;
        assert!(result.is_ok(), "{spec:?}: {result:?}");
        assert_eq!(tokens, 2, "{spec:?}");
    }
    // `a` was loaded again by the new process, on demand.
    assert_eq!(
        shard.load_labels().iter().filter(|l| *l == "a").count(),
        2,
        "{:?}",
        shard.load_labels()
    );
    assert_eq!(shard.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_restart_between_two_checks_is_noticed_by_the_instance_id() {
    let shard = fake_shard(1);
    let backend = recovering(&shard).await;
    assert!(finish(start(&backend, single("a"), 2)).await.1.is_ok());
    // Down and up again faster than the monitor looks: only the instance id tells.
    shard.restart();
    let t0 = Instant::now();
    while shard.load_labels().len() < 2 {
        // Wait until the new backend is serving (its first check passed), then use `a`.
        if backend.health().await {
            let (_, result) = finish(start(&backend, single("a"), 2)).await;
            if result.is_ok() {
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never recovered");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(shard.load_labels(), ["a", "a"]);
    assert_eq!(shard.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_request_that_meets_a_restarted_shard_gets_503_and_recovery_starts_at_once() {
    let shard = fake_shard(1);
    let config = test_config(test_limits(), PathBuf::new());
    let backend = ShardBackend::start(shard.clone(), &config)
        .await
        .expect("backend starts");
    // The monitor never polls: only the failed request can tell.
    let slow = RecoveryConfig {
        poll_interval: Duration::from_secs(3600),
        ..fast()
    };
    let backend = RecoveringBackend::new(backend, FakeConnector(shard.clone()), config, slow);
    assert!(finish(start(&backend, single("a"), 2)).await.1.is_ok());
    shard.restart();
    // The router still believes `a` sits in slot 1; the new process has no slot 1.
    let (_, result) = finish(start(&backend, single("a"), 2)).await;
    assert!(is_unavailable(&result), "{result:?}");
    assert_eq!(shard.violations().len(), 1, "{:?}", shard.violations());
    until_health(&backend, true).await;
    let (_, result) = finish(start(&backend, single("a"), 2)).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(shard.load_labels(), ["a", "a"]);
    assert_eq!(shard.violations().len(), 1, "{:?}", shard.violations());
}

#[tokio::test]
async fn one_slow_health_check_is_not_a_failure() {
    let shard = fake_shard(1);
    let backend = recovering(&shard).await;
    assert!(finish(start(&backend, single("a"), 2)).await.1.is_ok());
    // One failed check (below `failures`: the blip is shorter than the poll interval) keeps
    // the backend and its adapters.
    shard.blip(Duration::from_millis(15)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(backend.health().await);
    assert!(finish(start(&backend, single("a"), 2)).await.1.is_ok());
    assert_eq!(shard.load_labels(), ["a"]);
}

#[tokio::test]
async fn preloaded_adapters_are_preloaded_again_on_new_shards_until_unloaded() {
    let shard = fake_shard(1);
    let backend = recovering(&shard).await;
    let pinned = backend
        .preload(single("a"), true, true)
        .await
        .expect("preloaded");
    assert!(pinned.pinned);
    backend
        .preload(single("b"), false, true)
        .await
        .expect("preloaded");
    backend.unload(&single("b").key().hex()).expect("unloaded");
    shard.restart();
    // The new shards get `a` (pinned) again without a request; `b` was unloaded: not again.
    let t0 = Instant::now();
    loop {
        // The old backend still shows `a` until the restart is noticed: wait for the new load.
        let reloaded = shard.load_labels().len() == 3;
        let restored = backend.residency().ok().filter(|_| reloaded).and_then(|r| {
            r.adapters
                .into_iter()
                .find(|v| v.key == single("a").key() && v.state == AdapterState::Resident)
        });
        if let Some(view) = restored {
            assert!(view.pinned, "the pin is restored");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never restored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shard.load_labels(), ["a", "b", "a"]);
    assert_eq!(shard.violations(), Vec::<String>::new());
}
