//! What merge affinity buys behind a gateway: `--replicas` router+shard replicas of the tiny
//! model on this machine, a repeated mix of `--merges` named merges (each a TIES merge that
//! costs a computation when it is not cached), routed round-robin and then by the affinity
//! client of `medley_e2e::affinity` (which reads each replica's `medley_lora_requests_info`),
//! each on fresh replicas. Prints the merges computed, requests, wall time and mean latency.
//!
//! ```text
//! cargo bench -p medley-e2e --bench affinity
//! cargo bench -p medley-e2e --bench affinity -- --replicas 4 --merges 8 --rounds 6 --slots 2
//! ```

use std::time::Duration;

use clap::Parser;
use medley_e2e::affinity::{self, Outcome, Policy};

#[derive(Parser, Debug)]
#[command(about = "Merge computations with affinity routing vs round-robin over replicas")]
struct Args {
    /// Router+shard replicas.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Distinct named merges in the mix.
    #[arg(long, default_value_t = 8)]
    merges: usize,
    /// Passes over the mix (each in a shuffled order).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Adapter slots per replica.
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Seed of the request order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (names, yaml) = affinity::merges_yaml(args.merges);
    let merges_file = dir.path().join("merges.yaml");
    std::fs::write(&merges_file, yaml)?;
    let order = affinity::shuffled_rounds(&names, args.rounds, args.seed);
    println!(
        "{} replicas x {} slots, {} merges x {} rounds = {} requests, concurrency {}, {} tokens each",
        args.replicas,
        args.slots,
        args.merges,
        args.rounds,
        order.len(),
        args.concurrency,
        args.max_tokens
    );
    let mut rows: Vec<(Policy, Outcome)> = Vec::new();
    for policy in [Policy::RoundRobin, Policy::Affinity] {
        let replicas = affinity::start_replicas(args.replicas, args.slots, &merges_file).await?;
        let outcome =
            affinity::run_workload(policy, &replicas, &order, args.concurrency, args.max_tokens)
                .await?;
        rows.push((policy, outcome));
    }
    println!();
    println!(
        "| routing | requests | merges computed | merges / request | merge time s | wall s | mean latency ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (policy, o) in &rows {
        println!(
            "| {:?} | {} | {} | {:.2} | {:.3} | {:.2} | {:.1} |",
            policy,
            o.requests,
            o.merges,
            o.merges / o.requests.max(1) as f64,
            o.merge_seconds,
            o.wall.as_secs_f64(),
            ms(o.mean_latency)
        );
    }
    Ok(())
}
