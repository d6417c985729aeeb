//! The `--soak` scenario: many requests over many adapters and merges, errors counted by
//! status, the server's memory sampled as it goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use medley_e2e::Server;
use serde_json::json;

use super::load::StreamStats;
use super::{Args, header, merge_params, report, run_load_indexed};

/// The 12 longest times to first token of the soak, with each request's index, its adapter or
/// merge (`k % kinds`; merges are the odd ones), whether it was the first request of that kind
/// (which loads the adapter or computes the merge), and when it started.
fn slowest_first_tokens(indexed: &[(usize, StreamStats)], kinds: usize, started: Instant) {
    let mut slow: Vec<(usize, &StreamStats, Duration)> = indexed
        .iter()
        .filter_map(|(k, s)| Some((*k, s, s.ttft?)))
        .collect();
    slow.sort_by_key(|&(_, _, ttft)| std::cmp::Reverse(ttft));
    println!(
        "\nslowest first tokens (request, adapter/merge, first of its kind, started at, TTFT):"
    );
    for (k, s, ttft) in slow.into_iter().take(12) {
        let kind = k % kinds;
        let start = s.times.first().map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(started).saturating_sub(ttft)
        });
        println!(
            "  #{k:<5} {} {kind:<3} {:<5} {:>7.1} s {:>8.1} s",
            if kind.is_multiple_of(2) {
                "adapter"
            } else {
                "merge  "
            },
            if k < kinds { "yes" } else { "no" },
            start.as_secs_f64(),
            ttft.as_secs_f64()
        );
    }
}

pub(crate) async fn soak(args: &Args, server: &Server, adapters: &[PathBuf]) -> anyhow::Result<()> {
    let pid = server.pid().context("server pid")?;
    let ad = Arc::new(adapters.to_vec());
    let kinds = args.adapters.max(1);
    let params = Arc::new(move |k: usize| {
        let slot = k % kinds;
        if slot.is_multiple_of(2) {
            json!({"adapter_source": "local", "adapter_id": ad[slot % ad.len()].display().to_string()})
        } else {
            merge_params(slot, &ad)
        }
    });
    let rss = Arc::new(std::sync::Mutex::new(Vec::<(usize, u64)>::new()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (rss2, done2) = (rss.clone(), done.clone());
    let on_done = Arc::new(move |_k: usize| {
        let n = done2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n % 200 == 0
            && let Ok(mut v) = rss2.lock()
        {
            v.push((n, tree_rss_kib(pid)));
        }
    });
    let started = Instant::now();
    let (indexed, wall) = run_load_indexed(
        &server.http,
        args,
        args.requests,
        args.concurrency,
        params,
        Some(on_done),
    )
    .await;
    let stats: Vec<StreamStats> = indexed.iter().map(|(_, s)| s.clone()).collect();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for s in &stats {
        *by_status.entry(s.status).or_default() += 1;
    }
    println!(
        "soak: {} requests, concurrency {}, {} adapters/merges, {:.1} s",
        args.requests,
        args.concurrency,
        kinds,
        wall.as_secs_f64()
    );
    println!(
        "completed {} of {} (lost: {})",
        stats.len(),
        args.requests,
        args.requests - stats.len()
    );
    println!("by status: {by_status:?}");
    let short = stats
        .iter()
        .filter(|s| s.status == 200 && s.tokens != args.max_new_tokens as usize)
        .count();
    println!("successful streams with a wrong token count: {short}");
    header();
    report("soak", &stats, wall, args.concurrency);
    slowest_first_tokens(&indexed, kinds, started);
    println!("\nRSS of the server process tree after every 200 requests:");
    if let Ok(v) = rss.lock() {
        for (n, kib) in v.iter() {
            println!("  after {n:>5}: {:>8.1} MiB", *kib as f64 / 1024.0);
        }
        // The first 200 requests include warm-up (allocator arenas, merges computed, caches
        // filled); stability is judged from the end of the second 200 to the end.
        if v.len() >= 3 {
            let second = v[1].1 as f64;
            let last = v[v.len() - 1].1 as f64;
            println!(
                "growth from after request {} to after request {}: {:+.1}%",
                v[1].0,
                v[v.len() - 1].0,
                (last / second - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// Resident memory (KiB) of `pid` and all its descendants.
fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            total += status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                    stack.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
    }
    total
}
