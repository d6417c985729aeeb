//! Load generator: starts the real `medley serve` on a random model, drives N concurrent SSE
//! streams over M adapters/merges, and prints throughput, time-to-first-token and inter-token
//! latency percentiles.
//!
//! ```text
//! cargo bench -p medley-e2e --bench loadgen -- --preset tinyllama --layers 4 --cache-dir /tmp/medley-load
//! cargo bench -p medley-e2e --bench loadgen -- --soak --requests 1000 --concurrency 64 --adapters 16
//! ```
//!
//! Scenarios (default: `single`, `base`, `merges`):
//! * `single` — one request at a time on the base model (the reference throughput);
//! * `base` — `--concurrency` streams, all on the base model;
//! * `merges` — `--concurrency` streams spread over `--merges` distinct merges (each merge is
//!   warmed once first so its merge time is reported apart from decoding);
//! * `cache` — request latency of the base model, one adapter, and one merge (first request:
//!   the merge is computed; then cache hits), one request at a time with `max_new_tokens` 1: the
//!   difference between a cached merge and a single adapter is what the merge cache costs;
//! * `--soak` — `--requests` requests at `--concurrency` over `--adapters` adapters and merges,
//!   counting errors by status and sampling the server's RSS every 200 requests.
//!
//! Use a release build for meaningful numbers (`cargo bench` builds with the bench profile).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use medley_e2e::{Server, ServerOptions};
use serde_json::{Value, json};

#[path = "common/load.rs"]
mod load;
#[path = "loadgen/soak.rs"]
mod soak;
use load::{LoadPreset, StreamStats, percentile, prepare_model, stream_one};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// The 2-layer test fixture shape.
    Tiny,
    /// TinyLlama-1.1B's shape (random weights).
    Tinyllama,
}

#[derive(Parser, Debug)]
#[command(about = "Concurrent streams over adapters and merges against a real medley server")]
struct Args {
    /// Shape of the random model.
    #[arg(long, value_enum, default_value = "tinyllama")]
    preset: Preset,
    /// Keep only this many decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Where generated models and adapters are kept between runs.
    #[arg(long, default_value = "/tmp/medley-loadgen")]
    cache_dir: PathBuf,
    /// Concurrent streams.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per stream in the timed scenarios.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Distinct merges in the `merges` scenario.
    #[arg(long, default_value_t = 8)]
    merges: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: u32,
    /// Approximate prompt length in words.
    #[arg(long, default_value_t = 24)]
    prompt_words: usize,
    /// LoRA rank of the generated adapters.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Scenarios to run, in this order in every round (`merges` sits next to both scenarios it
    /// is compared with, so a drift of the machine's speed within a round touches its ratios
    /// least).
    #[arg(long, value_delimiter = ',', default_value = "base,merges,single")]
    scenarios: Vec<String>,
    /// Rounds in which every scenario runs once (ratios are medians over rounds).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Run the soak test instead.
    #[arg(long)]
    soak: bool,
    /// Soak: total requests.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Soak: distinct adapters and merges.
    #[arg(long, default_value_t = 16)]
    adapters: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Extra flags for `medley serve` (one per occurrence: `--serve-args=--flag
    /// --serve-args=value`). What Medley did before chunked prefill and prefix caching:
    /// `--max-batch-prefill-tokens 1024 --prefix-caching off --waiting-served-ratio 0.3`.
    #[arg(long, allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

/// Aggregate decode throughput: the tokens that are not a request's first token and arrive while
/// `concurrency` streams are all in their decode phase (between their first and last token),
/// divided by the length of those periods. Prefill of requests that join later and the ramp-up
/// and drain at the ends are left out, so this is the steady-state decode rate of `concurrency`
/// streams. `None` when the streams never decoded all at once.
fn decode_tps(stats: &[StreamStats], concurrency: usize) -> Option<f64> {
    let mut edges: Vec<(Instant, i32)> = vec![];
    for s in stats
        .iter()
        .filter(|s| s.status == 200 && s.times.len() >= 2)
    {
        edges.push((s.times[0], 1));
        edges.push((*s.times.last()?, -1));
    }
    // Ends sort before starts at the same instant (a finished stream no longer decodes).
    edges.sort_by_key(|&(t, d)| (t, d));
    let mut periods: Vec<(Instant, Instant)> = vec![];
    let (mut active, mut since) = (0i32, None);
    for (t, d) in edges {
        active += d;
        if active as usize >= concurrency {
            since.get_or_insert(t);
        } else if let Some(a) = since.take() {
            periods.push((a, t));
        }
    }
    let span: f64 = periods.iter().map(|(a, b)| (*b - *a).as_secs_f64()).sum();
    if span <= 0.0 {
        return None;
    }
    let tokens = stats
        .iter()
        .filter(|s| s.status == 200)
        .flat_map(|s| s.times.iter().skip(1))
        .filter(|t| periods.iter().any(|(a, b)| *t > a && *t <= b))
        .count();
    Some(tokens as f64 / span)
}

/// Generates (or reuses) the model and the adapters.
fn prepare(args: &Args) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let preset = match args.preset {
        Preset::Tiny => LoadPreset::Tiny,
        Preset::Tinyllama => LoadPreset::Tinyllama,
    };
    prepare_model(
        &args.cache_dir,
        preset,
        args.layers,
        args.rank,
        args.adapters.max(4),
    )
}

/// The `parameters` of request `k` for the `merges` scenario: merge `k % merges`.
fn merge_params(k: usize, adapters: &[PathBuf]) -> Value {
    let strategies = ["linear", "ties", "dare_ties", "cat"];
    let n = adapters.len();
    let ids: Vec<String> = (0..3)
        .map(|j| adapters[(k + j) % n].display().to_string())
        .collect();
    let strategy = strategies[k % strategies.len()];
    json!({
        "adapter_source": "local",
        "merged_adapters": {
            "ids": ids,
            "weights": [1.0, 0.5 + 0.1 * (k % 4) as f64, -0.3],
            "merge_strategy": strategy,
            "density": 0.5,
        }
    })
}

fn prompt(k: usize, words: usize) -> String {
    const W: [&str; 12] = [
        "the", "model", "merges", "adapters", "for", "every", "request", "quickly", "and", "then",
        "streams", "tokens",
    ];
    (0..words + (k % 7))
        .map(|i| W[(i * 7 + k) % W.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `total` requests with `concurrency` workers; `params(k)` gives request k's adapter fields.
async fn run_load(
    http: &str,
    args: &Args,
    total: usize,
    concurrency: usize,
    params: Arc<dyn Fn(usize) -> Value + Send + Sync>,
    on_done: Option<Arc<dyn Fn(usize) + Send + Sync>>,
) -> (Vec<StreamStats>, Duration) {
    let (stats, wall) = run_load_indexed(http, args, total, concurrency, params, on_done).await;
    (stats.into_iter().map(|(_, s)| s).collect(), wall)
}

/// [`run_load`] with the index `k` of every request, in the order of `k`.
async fn run_load_indexed(
    http: &str,
    args: &Args,
    total: usize,
    concurrency: usize,
    params: Arc<dyn Fn(usize) -> Value + Send + Sync>,
    on_done: Option<Arc<dyn Fn(usize) + Send + Sync>>,
) -> (Vec<(usize, StreamStats)>, Duration) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let next = next.clone();
        let params = params.clone();
        let on_done = on_done.clone();
        let http = http.to_string();
        let (words, max_new) = (args.prompt_words, args.max_new_tokens);
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k >= total {
                    break;
                }
                let mut p = params(k);
                if let Some(obj) = p.as_object_mut() {
                    obj.insert("max_new_tokens".into(), json!(max_new));
                    obj.insert("ignore_eos_token".into(), json!(true));
                }
                out.push((
                    k,
                    stream_one(&http, json!({"inputs": prompt(k, words), "parameters": p})).await,
                ));
                if let Some(f) = &on_done {
                    f(k);
                }
            }
            out
        }));
    }
    let mut all = vec![];
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    all.sort_by_key(|(k, _)| *k);
    (all, start.elapsed())
}

/// Throughput of one scenario.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// All tokens over the wall time (prefill included).
    end_to_end: f64,
    /// See [`decode_tps`].
    decode: Option<f64>,
}

fn report(name: &str, stats: &[StreamStats], wall: Duration, concurrency: usize) -> Throughput {
    let ok: Vec<&StreamStats> = stats.iter().filter(|s| s.status == 200).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok
        .iter()
        .filter_map(|s| s.ttft)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|s| s.itl.iter().map(|d| d.as_secs_f64() * 1e3))
        .collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let end_to_end = tokens as f64 / wall.as_secs_f64();
    let decode = decode_tps(stats, concurrency);
    println!(
        "| {name:<28} | {:>4}/{:<4} | {:>9.1} | {:>9.1} | {:>7.0} | {:>7.0} | {:>7.0} | {:>6.1} | {:>6.1} | {:>6.1} |",
        ok.len(),
        stats.len(),
        end_to_end,
        decode.unwrap_or(f64::NAN),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.9),
        percentile(&ttft, 0.99),
        percentile(&itl, 0.5),
        percentile(&itl, 0.9),
        percentile(&itl, 0.99),
    );
    Throughput { end_to_end, decode }
}

fn header() {
    println!(
        "| scenario                     | ok/total  | e2e tok/s | dec tok/s | TTFT50  | TTFT90  | TTFT99  | ITL50  | ITL90  | ITL99  |"
    );
    println!(
        "|------------------------------|-----------|-----------|-----------|---------|---------|---------|--------|--------|--------|"
    );
    println!(
        "(e2e: all tokens / wall time; dec: aggregate decode rate while every stream decodes; ms)"
    );
}

async fn start_server(args: &Args, model: &Path, adapters: &[PathBuf]) -> anyhow::Result<Server> {
    let root = adapters
        .first()
        .and_then(|a| a.parent())
        .context("no adapters")?
        .to_path_buf();
    let mut serve = vec![
        "--adapter-root".to_string(),
        root.display().to_string(),
        "--max-input-length".into(),
        "256".into(),
        "--max-total-tokens".into(),
        "512".into(),
        "--max-concurrent-requests".into(),
        "256".into(),
    ];
    serve.extend(args.serve_args.iter().cloned());
    Server::start(ServerOptions {
        model: Some(model.to_path_buf()),
        args: serve,
        ..Default::default()
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (model, adapters) = prepare(&args)?;
    eprintln!("starting medley serve on {}", model.display());
    let server = start_server(&args, &model, &adapters).await?;
    let http = server.http.clone();
    if args.soak {
        return soak::soak(&args, &server, &adapters).await;
    }
    println!(
        "model: {:?} with {} layers, rank-{} adapters, {} new tokens per request, concurrency {}",
        args.preset, args.layers, args.rank, args.max_new_tokens, args.concurrency
    );
    header();
    // Scenarios take turns for `--repeats` rounds, so a change of the (shared) machine's speed
    // hits all of them alike; ratios are taken within a round and their median reported.
    let mut results: BTreeMap<String, Vec<Throughput>> = BTreeMap::new();
    let mut warmed = false;
    for _ in 0..args.repeats.max(1) {
        for scenario in &args.scenarios {
            if let Some(t) = run_scenario(scenario, &http, &args, &adapters, &mut warmed).await? {
                results.entry(scenario.clone()).or_default().push(t);
            }
        }
    }
    let summary = |a: &str, b: &str, what: &str, target: &str| {
        let (Some(x), Some(y)) = (results.get(a), results.get(b)) else {
            return;
        };
        let mut dec: Vec<f64> = x
            .iter()
            .zip(y)
            .filter_map(|(p, q)| Some(p.decode? / q.decode?))
            .collect();
        let mut e2e: Vec<f64> = x
            .iter()
            .zip(y)
            .map(|(p, q)| p.end_to_end / q.end_to_end)
            .collect();
        dec.sort_by(f64::total_cmp);
        e2e.sort_by(f64::total_cmp);
        let list = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{what}: decode median {:.2}x [{}], end to end median {:.2}x [{}] (target: {target})",
            percentile(&dec, 0.5),
            list(&dec),
            percentile(&e2e, 0.5),
            list(&e2e),
        );
    };
    println!();
    summary(
        "merges",
        "single",
        "merges / single throughput",
        "decode >= 6x",
    );
    summary(
        "base",
        "merges",
        "base / merges throughput",
        "decode <= 1.15x",
    );
    drop(server);
    Ok(())
}

/// Runs one scenario and prints its row; `None` for scenarios without a throughput.
async fn run_scenario(
    scenario: &str,
    http: &str,
    args: &Args,
    adapters: &[PathBuf],
    warmed: &mut bool,
) -> anyhow::Result<Option<Throughput>> {
    let n = args.concurrency;
    let total = n * args.rounds;
    Ok(Some(match scenario {
        "single" => {
            let (s, wall) = run_load(http, args, 4, 1, Arc::new(|_| json!({})), None).await;
            report("single (base, 1 stream)", &s, wall, 1)
        }
        "base" => {
            let (s, wall) = run_load(http, args, total, n, Arc::new(|_| json!({})), None).await;
            report(&format!("base x{n}"), &s, wall, n)
        }
        "merges" => {
            let merges = args.merges;
            let ad = Arc::new(adapters.to_vec());
            if !*warmed {
                // Warm every merge once (its merge time is not decode throughput).
                let warm = Instant::now();
                let ad2 = ad.clone();
                let params = Arc::new(move |k| merge_params(k, &ad2));
                let (w, _) = run_load(http, args, merges, merges, params, None).await;
                let failed = w.iter().filter(|s| s.status != 200).count();
                eprintln!(
                    "warmed {merges} merges in {:.2} s ({failed} failed)",
                    warm.elapsed().as_secs_f64()
                );
                *warmed = true;
            }
            let params = Arc::new(move |k| merge_params(k % merges, &ad));
            let (s, wall) = run_load(http, args, total, n, params, None).await;
            report(&format!("{merges} merges x{n}"), &s, wall, n)
        }
        "cache" => {
            cache_latency(http, adapters).await?;
            return Ok(None);
        }
        other => anyhow::bail!("unknown scenario `{other}`"),
    }))
}

/// Latency of one-token requests: base, a single adapter, and a merge (cold, then cached).
async fn cache_latency(http: &str, adapters: &[PathBuf]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let once = |params: Value| {
        let client = client.clone();
        let url = format!("{http}/generate");
        async move {
            let mut p = params;
            if let Some(o) = p.as_object_mut() {
                o.insert("max_new_tokens".into(), json!(1));
            }
            let t = Instant::now();
            let r = client
                .post(url)
                .json(&json!({"inputs": "hello world", "parameters": p}))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "status {}", r.status());
            r.bytes().await?;
            Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
        }
    };
    let single =
        json!({"adapter_source": "local", "adapter_id": adapters[0].display().to_string()});
    let merge = merge_params(1, adapters);
    let cold = once(merge.clone()).await?;
    println!("\nfirst request of a new merge (merge computed): {cold:.1} ms");
    let n = 200;
    println!("| request (max_new_tokens 1, n={n}) | p50 ms | p90 ms | mean ms |");
    println!("|---|---|---|---|");
    let mut means = BTreeMap::new();
    for (name, params) in [
        ("base", json!({})),
        ("single adapter", single),
        ("cached merge", merge),
    ] {
        once(params.clone()).await?; // warm
        let mut ms = vec![];
        for _ in 0..n {
            ms.push(once(params.clone()).await?);
        }
        ms.sort_by(f64::total_cmp);
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        println!(
            "| {name} | {:.3} | {:.3} | {mean:.3} |",
            percentile(&ms, 0.5),
            percentile(&ms, 0.9)
        );
        means.insert(name, mean);
    }
    if let (Some(m), Some(s)) = (means.get("cached merge"), means.get("single adapter")) {
        println!(
            "cached merge - single adapter: {:+.3} ms per request",
            m - s
        );
    }
    Ok(())
}
