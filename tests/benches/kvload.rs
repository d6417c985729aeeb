//! KV-cache load benchmarks: chunked prefill, prefix caching and preemption against the real
//! `medley serve` on a random TinyLlama-shaped model, each scenario run on a server with the
//! `--before` flags (one-step prefill, no prefix cache, TGI's waiting rule: what Medley did
//! before the paged KV cache) and one with the `--after` flags (the defaults), in the same run.
//! `--variants after` runs one side only; `KVLOAD_TRACE=1` prints the first stream's
//! inter-token latencies in `join` (`*` marks those after the join was sent).
//!
//! ```text
//! cargo bench -p medley-e2e --bench kvload -- --layers 4 --scenarios join,prefix,preempt
//! ```
//!
//! * `join` — `--streams` streams decode on the base model; once all of them have tokens, a
//!   `--join-tokens`-token prompt joins. Reports the median inter-token latency of the running
//!   streams and the worst one after the join was sent (target: worst ≤ 3× median).
//! * `prefix` — cold TTFT (a prompt whose prefix was never seen; median of 3), then one
//!   warm-up request with a `--prefix-tokens`-token prefix, then `--requests` requests with
//!   that prefix and distinct `--suffix-tokens`-token suffixes, one at a time. Reports their
//!   TTFT p50 against the cold one (target ≤ 20%) and the prompt tokens the shards computed
//!   (`medley_prefill_computed_tokens_total`) against all their prompt tokens (target ≤ 10%).
//! * `preempt` — a KV pool of `--pool-seqs` full-length sequences and a batch budget that
//!   admits `--concurrency` of them: all requests must complete with the tokens they get at a
//!   concurrency that fits (`--pool-seqs`), preempting when the pool runs out.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use medley_e2e::{Server, ServerOptions};
use serde_json::{Value, json};

#[path = "common/load.rs"]
mod load;
use load::{LoadPreset, percentile, prepare_model, sorted_ms, stream_one, stream_with};

#[derive(Parser, Debug)]
#[command(about = "Chunked prefill, prefix caching and preemption under load")]
struct Args {
    /// Decoder layers of the TinyLlama-shaped random model.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Where the generated model is kept between runs.
    #[arg(long, default_value = "/tmp/medley-loadgen")]
    cache_dir: PathBuf,
    /// Scenarios, in order.
    #[arg(long, value_delimiter = ',', default_value = "join,prefix,preempt")]
    scenarios: Vec<String>,
    /// `medley serve` flags of the "before" server (space separated).
    #[arg(
        long,
        default_value = "--max-batch-prefill-tokens 8192 --max-idle-prefill-tokens 8192 --prefix-caching off --waiting-served-ratio 0.3"
    )]
    before: String,
    /// `medley serve` flags of the "after" server (space separated; empty = defaults).
    #[arg(long, default_value = "")]
    after: String,
    /// Variants to run, in order (`before`, `after`).
    #[arg(long, value_delimiter = ',', default_value = "before,after")]
    variants: Vec<String>,
    /// join: running streams.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// join: prompt tokens of the joining request.
    #[arg(long, default_value_t = 1000)]
    join_tokens: usize,
    /// prefix: shared prefix tokens.
    #[arg(long, default_value_t = 512)]
    prefix_tokens: usize,
    /// prefix: distinct suffix tokens.
    #[arg(long, default_value_t = 16)]
    suffix_tokens: usize,
    /// prefix: requests after the warm-up.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// preempt: full-length sequences the KV pool holds.
    #[arg(long, default_value_t = 8)]
    pool_seqs: usize,
    /// preempt: concurrent requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// preempt: prompt tokens and new tokens of each request (full length = twice this).
    #[arg(long, default_value_t = 96)]
    half_length: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const WORDS: [&str; 16] = [
    "the", "model", "merges", "adapters", "for", "every", "request", "quickly", "and", "then",
    "streams", "tokens", "while", "blocks", "share", "prefixes",
];

/// A text of exactly `n` tokens (cut at a token boundary found with `/tokenize`); `seed`
/// varies the words.
async fn text_of(http: &str, n: usize, seed: usize) -> anyhow::Result<String> {
    let words: Vec<&str> = (0..n * 2 + 8)
        .map(|i| WORDS[(i * 7 + seed * 13 + i / 16) % WORDS.len()])
        .collect();
    let mut text = format!("{seed} {}", words.join(" "));
    let toks: Vec<Value> = reqwest::Client::new()
        .post(format!("{http}/tokenize"))
        .json(&json!({"inputs": text, "add_special_tokens": false}))
        .send()
        .await?
        .json()
        .await?;
    let stop = toks
        .get(n - 1)
        .and_then(|t| t["stop"].as_u64())
        .context("text too short for the token count")?;
    text.truncate(stop as usize);
    Ok(text)
}

fn body(inputs: &str, new: usize) -> Value {
    json!({"inputs": inputs, "parameters": {"max_new_tokens": new, "ignore_eos_token": true}})
}

/// Reads a counter or gauge (summed over label sets) from `/metrics`.
async fn metric(http: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Starts `medley serve` with `limits` (token-limit flags), then the variant's `flags`.
async fn start(model: &std::path::Path, limits: &[String], flags: &str) -> anyhow::Result<Server> {
    let mut serve = vec!["--max-concurrent-requests".to_string(), "256".into()];
    serve.extend(limits.iter().cloned());
    serve.extend(flags.split_whitespace().map(str::to_string));
    Server::start(ServerOptions {
        model: Some(model.to_path_buf()),
        args: serve,
        ..Default::default()
    })
    .await
}

async fn join(http: &str, args: &Args) -> anyhow::Result<String> {
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for k in 0..args.streams {
        let (http, ready) = (http.to_string(), ready.clone());
        let prompt = text_of(&http, 24, 100 + k).await?;
        tasks.push(tokio::spawn(async move {
            stream_with(&http, body(&prompt, 160), move |n| {
                if n == 4 {
                    ready.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await
        }));
    }
    let waited = Instant::now();
    while ready.load(Ordering::SeqCst) < args.streams {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(300),
            "streams never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let long = text_of(http, args.join_tokens, 7).await?;
    let sent = Instant::now();
    let joined = stream_one(http, body(&long, 1)).await;
    let mut running = vec![];
    for t in tasks {
        running.push(t.await?);
    }
    anyhow::ensure!(joined.status == 200, "join failed: {}", joined.status);
    let all = sorted_ms(running.iter().flat_map(|s| s.itl.iter()));
    let after: Vec<f64> = sorted_ms(running.iter().flat_map(|s| {
        s.itl
            .iter()
            .zip(&s.times[1..])
            .filter(|(_, t)| **t > sent)
            .map(|(d, _)| d)
    }));
    if std::env::var_os("KVLOAD_TRACE").is_some() {
        let s = &running[0];
        let line: Vec<String> = s
            .itl
            .iter()
            .zip(&s.times[1..])
            .map(|(d, t)| {
                let mark = if *t > sent { "*" } else { "" };
                format!("{mark}{:.0}", d.as_secs_f64() * 1e3)
            })
            .collect();
        eprintln!(
            "stream 0 ITLs: {}; first token {:?} before the join, last {:?} after",
            line.join(" "),
            sent.saturating_duration_since(s.times[0]),
            s.times.last().map(|t| t.saturating_duration_since(sent))
        );
    }
    let (median, worst) = (
        percentile(&all, 0.5),
        after.last().copied().unwrap_or(f64::NAN),
    );
    Ok(format!(
        "ITL median {median:.0} ms, worst after the join {worst:.0} ms, ratio {:.2} (target <= 3); join TTFT {:.0} ms",
        worst / median,
        joined.ttft.unwrap_or_default().as_secs_f64() * 1e3
    ))
}

async fn prefix(http: &str, args: &Args) -> anyhow::Result<String> {
    let n = args.prefix_tokens + args.suffix_tokens;
    let mut cold = vec![];
    for k in 0..3 {
        let p = text_of(http, n, 500 + k).await?;
        cold.push(
            stream_one(http, body(&p, 1))
                .await
                .ttft
                .context("no token")?,
        );
    }
    let cold = percentile(&sorted_ms(&cold), 0.5);
    let shared = text_of(http, args.prefix_tokens, 42).await?;
    let suffix = |k: usize| format!(" {k} {}", WORDS[k % WORDS.len()]);
    let warm = format!("{shared}{}", suffix(999));
    stream_one(http, body(&warm, 1)).await;
    let computed0 = metric(http, "medley_prefill_computed_tokens_total").await?;
    let mut ttft = vec![];
    let mut prompt_tokens = 0usize;
    for k in 0..args.requests {
        // Distinct suffixes of about `suffix_tokens` tokens.
        let tail: String = (0..args.suffix_tokens / 2)
            .map(|i| format!(" {}", WORDS[(k * 5 + i) % WORDS.len()]))
            .collect();
        let p = format!("{shared}{}{tail}", suffix(k));
        let toks: Vec<Value> = reqwest::Client::new()
            .post(format!("{http}/tokenize"))
            .json(&json!({"inputs": p}))
            .send()
            .await?
            .json()
            .await?;
        prompt_tokens += toks.len();
        ttft.push(
            stream_one(http, body(&p, 1))
                .await
                .ttft
                .context("no token")?,
        );
    }
    let computed = metric(http, "medley_prefill_computed_tokens_total").await? - computed0;
    let p50 = percentile(&sorted_ms(&ttft), 0.5);
    Ok(format!(
        "cold TTFT {cold:.0} ms, warm TTFT p50 {p50:.0} ms ({:.0}%, target <= 20%); computed {computed:.0} of {prompt_tokens} prompt tokens ({:.1}%, target <= 10%)",
        p50 / cold * 100.0,
        computed / prompt_tokens as f64 * 100.0
    ))
}

/// Generated texts of `prompts` at `concurrency`, with the largest number of preempted
/// requests seen on `/metrics` meanwhile.
async fn generate_all(
    http: &str,
    prompts: &[String],
    new: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Option<String>>, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let prompts = Arc::new(prompts.to_vec());
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let (next, prompts, http) = (next.clone(), prompts.clone(), http.to_string());
        tasks.push(tokio::spawn(async move {
            let mut out = vec![];
            loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(p) = prompts.get(k) else { break };
                let r = reqwest::Client::new()
                    .post(format!("{http}/generate"))
                    .json(&body(p, new))
                    .send()
                    .await;
                let text = match r {
                    Ok(r) if r.status().is_success() => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["generated_text"].as_str().map(str::to_string)),
                    _ => None,
                };
                out.push((k, text));
            }
            out
        }));
    }
    let mut max_preempted = 0f64;
    while !tasks.iter().all(|t| t.is_finished()) {
        max_preempted = max_preempted.max(metric(http, "medley_requests_preempted").await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut texts = vec![None; prompts.len()];
    for t in tasks {
        for (k, text) in t.await? {
            texts[k] = text;
        }
    }
    Ok((texts, max_preempted))
}

async fn preempt(http: &str, args: &Args) -> anyhow::Result<String> {
    let mut prompts = vec![];
    for k in 0..args.concurrency {
        // Room for the BOS token the server adds.
        prompts.push(text_of(http, args.half_length - 2, 300 + k).await?);
    }
    let new = args.half_length;
    let t = Instant::now();
    let (got, preempted) = generate_all(http, &prompts, new, args.concurrency).await?;
    let wall = t.elapsed().as_secs_f64();
    let (want, _) = generate_all(http, &prompts, new, args.pool_seqs).await?;
    let done = got.iter().filter(|t| t.is_some()).count();
    let same = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.is_some() && a == b)
        .count();
    Ok(format!(
        "{done}/{} completed in {wall:.1} s, {same} equal to the run at concurrency {}; up to {preempted:.0} requests preempted at once",
        args.concurrency, args.pool_seqs
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (model, _) = prepare_model(&args.cache_dir, LoadPreset::Tinyllama, args.layers, 8, 0)?;
    println!("model: TinyLlama shape, {} layers, f32", args.layers);
    for scenario in &args.scenarios {
        for (variant, flags) in [("before", &args.before), ("after", &args.after)] {
            if !args.variants.iter().any(|v| v == variant) {
                continue;
            }
            let full = 2 * args.half_length;
            let limits: Vec<String> = match scenario.as_str() {
                // A pool of `pool_seqs` full-length requests, a batch budget of `concurrency`.
                "preempt" => [
                    "--max-input-length".to_string(),
                    (full - 1).to_string(),
                    "--max-total-tokens".into(),
                    full.to_string(),
                    "--kv-cache-tokens".into(),
                    (args.pool_seqs * full).to_string(),
                    "--max-batch-total-tokens".into(),
                    (args.concurrency * full).to_string(),
                ]
                .to_vec(),
                _ => ["--max-input-length", "2047", "--max-total-tokens", "2048"]
                    .map(String::from)
                    .to_vec(),
            };
            let server = start(&model, &limits, flags).await?;
            let http = server.http.clone();
            let line = match scenario.as_str() {
                "join" => join(&http, &args).await,
                "prefix" => prefix(&http, &args).await,
                "preempt" => preempt(&http, &args).await,
                other => anyhow::bail!("unknown scenario `{other}`"),
            };
            println!(
                "| {scenario:<8} | {variant:<6} | {} |",
                line.unwrap_or_else(|e| format!("failed: {e:#}"))
            );
            drop(server);
        }
    }
    Ok(())
}
