//! Shard failure under load: `kill -9` of one tensor-parallel rank while requests over the base
//! model, an adapter and a merge run. Every request in flight ends with 503 (never a hang, a
//! 500 or a 424), `/health` turns red, the launcher restarts the whole group
//! (`--shard-restart on-failure`, the default), the router reconnects by itself, `/health`
//! turns green, and the same requests give the same tokens as before, adapters and merges
//! loaded again on demand.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use medley_e2e::{Server, fixture_adapters, token_ids};
use serde_json::{Value, json};

/// A request of each kind: base model, one adapter, a TIES merge.
fn requests() -> Vec<(&'static str, Value)> {
    let params = |extra: Value| {
        let mut p = json!({"max_new_tokens": 48, "details": true, "ignore_eos_token": true});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"inputs": "The quick brown fox", "parameters": p})
    };
    vec![
        ("base", params(json!({}))),
        (
            "adapter",
            params(json!({"adapter_id": "a_r4", "adapter_source": "local"})),
        ),
        (
            "merge",
            params(json!({
                "adapter_source": "local",
                "merged_adapters": {
                    "ids": ["a_r4", "b_r4_alpha16"],
                    "weights": [0.7, 0.5],
                    "merge_strategy": "ties",
                    "density": 0.5,
                    "majority_sign_method": "total",
                }
            })),
        ),
    ]
}

/// The greedy tokens of every request kind, one at a time.
async fn tokens_of_each(s: &Server) -> Vec<Vec<u64>> {
    let mut out = vec![];
    for (kind, body) in requests() {
        let r = s.post("/generate", &body).await.unwrap();
        assert_eq!(r.status, 200, "{kind}: {}", r.body);
        out.push(token_ids(&r.body));
    }
    out
}

/// How one request under load ended.
#[derive(Debug)]
struct Outcome {
    status: u16,
    body: Value,
    took: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_rank_under_load_fails_in_flight_requests_and_the_group_comes_back() {
    let s = Arc::new(
        Server::with_adapter_root_and_shards(&fixture_adapters(), 2)
            .await
            .unwrap(),
    );
    let before = tokens_of_each(&s).await;
    let victim = s.shard_pid(1).expect("rank 1 runs");

    // Load: each request kind in a loop, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = vec![];
    for (_, body) in requests().into_iter().chain(requests()) {
        let (s, stop) = (s.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut outcomes = vec![];
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(30), s.post("/generate", &body))
                    .await
                    .expect("a request hung for 30 s")
                    .unwrap();
                outcomes.push(Outcome {
                    status: r.status,
                    body: r.body,
                    took: t0.elapsed(),
                });
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SAFETY: kill(2) with a pid read from /proc for this test's own shard.
    assert_eq!(
        unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) },
        0
    );

    // Health goes red, then green once the group is back.
    let killed = Instant::now();
    let mut red = None;
    let green = loop {
        let (status, _) = s.get("/health").await.unwrap();
        if status != 200 {
            red.get_or_insert(killed.elapsed());
        } else if red.is_some() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "health: red after {red:?}, never green again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let red = red.expect("health never went red");
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = vec![];
    for task in load {
        outcomes.extend(task.await.unwrap());
    }

    // Every request under load either finished or got a 503 naming the shards.
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    for o in &failed {
        assert_eq!(o.status, 503, "{o:?}");
        let message = o.body["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(message.contains("shard"), "{o:?}");
        assert_eq!(o.body["error_type"], "unavailable", "{o:?}");
    }
    assert!(
        !failed.is_empty(),
        "no request was in flight or refused: {} finished",
        outcomes.len()
    );
    let slowest_failure = failed.iter().map(|o| o.took).max().unwrap();
    assert!(
        slowest_failure < Duration::from_secs(30),
        "{slowest_failure:?}"
    );

    // The group was restarted (both ranks are new processes) and serves as before.
    let new_rank1 = s.shard_pid(1).expect("rank 1 runs again");
    assert_ne!(new_rank1, victim);
    assert_eq!(tokens_of_each(&s).await, before);
    assert_eq!(s.metric("medley_shard_restarts").await.unwrap(), Some(1.0));
    assert!(s.metric("medley_shard_recoveries").await.unwrap() >= Some(1.0));
    println!(
        "kill -9 rank 1: health red after {red:?}, green after {green:?}; {} requests under load, {} failed (503), slowest failure {slowest_failure:?}",
        outcomes.len(),
        failed.len()
    );
}
