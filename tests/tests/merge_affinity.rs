//! Merge-aware routing as a gateway sees it: named merges requested by OpenAI `model` over two
//! replicas with two adapter slots each. Routed by the adapter info gauge
//! (`medley_e2e::affinity`, the reference endpoint picker's LoRA affinity in miniature), each
//! merge is computed once and then always served where it is cached; round-robin computes the
//! same mix again and again.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use medley_e2e::affinity::{self, Policy, ReplicaView};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_routing_computes_each_merge_once() {
    let dir = tempfile::tempdir().unwrap();
    let (names, yaml) = affinity::merges_yaml(4);
    let file = dir.path().join("merges.yaml");
    std::fs::write(&file, yaml).unwrap();
    let order = affinity::shuffled_rounds(&names, 3, 11);

    let replicas = affinity::start_replicas(2, 2, &file).await.unwrap();
    let by_affinity = affinity::run_workload(Policy::Affinity, &replicas, &order, 1, 2)
        .await
        .unwrap();
    assert_eq!(by_affinity.requests, 12);
    assert_eq!(by_affinity.merges, 4.0, "each merge computed once");
    // Each merge is resident on exactly one replica, listed under its name.
    let mut views = Vec::new();
    for r in &replicas {
        views.push(ReplicaView::scrape(r).await.unwrap());
    }
    for name in &names {
        let holders = views.iter().filter(|v| v.running.contains(name)).count();
        assert_eq!(holders, 1, "{name}: {views:?}");
    }
    for v in &views {
        assert_eq!(v.running.len(), 2, "{v:?}");
    }
    drop(replicas);

    let replicas = affinity::start_replicas(2, 2, &file).await.unwrap();
    let round_robin = affinity::run_workload(Policy::RoundRobin, &replicas, &order, 1, 2)
        .await
        .unwrap();
    assert_eq!(round_robin.requests, 12);
    assert!(
        round_robin.merges > by_affinity.merges,
        "round-robin {} vs affinity {}",
        round_robin.merges,
        by_affinity.merges
    );
}
