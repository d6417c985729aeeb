//! Pieces shared by the load benchmarks (`loadgen.rs`, `kvload.rs`, included with `#[path]`):
//! one SSE stream with its timings, percentiles, and the random models and adapters they serve.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

/// What one stream observed.
#[derive(Debug, Default, Clone)]
pub(crate) struct StreamStats {
    /// Time to the first token event.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive token events.
    pub itl: Vec<Duration>,
    /// When each token event arrived.
    pub times: Vec<Instant>,
    /// Token events received.
    pub tokens: usize,
    /// HTTP status; 599 (no response), 598 (broken stream) and 597 (error event) are ours.
    pub status: u16,
}

/// Streams `body` from `{http}/generate_stream`, timing every token event.
pub(crate) async fn stream_one(http: &str, body: Value) -> StreamStats {
    stream_with(http, body, |_| {}).await
}

/// [`stream_one`], calling `on_token(n)` after the `n`-th token event.
pub(crate) async fn stream_with(http: &str, body: Value, on_token: impl Fn(usize)) -> StreamStats {
    let start = Instant::now();
    let client = reqwest::Client::new();
    let mut stats = StreamStats::default();
    let resp = match client
        .post(format!("{http}/generate_stream"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            stats.status = 599;
            return stats;
        }
    };
    stats.status = resp.status().as_u16();
    if !resp.status().is_success() {
        return stats;
    }
    let mut last = start;
    let mut buf = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else {
            stats.status = 598;
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            if !event.contains("data:") {
                continue;
            }
            if event.contains("\"error\"") {
                stats.status = 597;
                continue;
            }
            let now = Instant::now();
            if stats.ttft.is_none() {
                stats.ttft = Some(now - start);
            } else {
                stats.itl.push(now - last);
            }
            last = now;
            stats.tokens += 1;
            stats.times.push(now);
            on_token(stats.tokens);
        }
    }
    stats
}

/// The `p` quantile (0–1) of sorted values, nearest rank; NaN when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Sorted milliseconds of `durations`.
pub(crate) fn sorted_ms<'a>(durations: impl IntoIterator<Item = &'a Duration>) -> Vec<f64> {
    let mut v: Vec<f64> = durations
        .into_iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// A random-weight model shape for the load benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadPreset {
    /// The 2-layer test fixture shape.
    Tiny,
    /// TinyLlama-1.1B's shape.
    Tinyllama,
}

/// Generates (or reuses, under `cache_dir`) a random model of `preset` with `layers` layers
/// and `adapters` rank-`rank` adapters for it.
pub(crate) fn prepare_model(
    cache_dir: &Path,
    preset: LoadPreset,
    layers: usize,
    rank: usize,
    adapters: usize,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    use medley_merge::fixture::AdapterFixture;
    use medley_shard::fixture::{
        FixtureDType, ModelFixture, adapter_shape, tiny_config, tinyllama_config,
    };
    let (mut config, tag) = match preset {
        LoadPreset::Tiny => (tiny_config(), "tiny"),
        LoadPreset::Tinyllama => (tinyllama_config(), "tinyllama"),
    };
    config.num_hidden_layers = layers;
    let mut fx = ModelFixture::tiny(FixtureDType::F32);
    fx.config = config.clone();
    let model_dir = fx.cached(Some(cache_dir), &format!("{tag}-{layers}l"))?.dir;
    let shapes = adapter_shape(&config).module_shapes();
    let mut dirs = vec![];
    for i in 0..adapters {
        let dir = cache_dir
            .join(format!("adapters-{tag}-{layers}l-r{rank}"))
            .join(format!("a{i}"));
        if !dir.join("adapter_model.safetensors").exists() {
            AdapterFixture::new(rank, 1000 + i as u64).write(&dir, &shapes)?;
        }
        dirs.push(dir);
    }
    Ok((model_dir, dirs))
}
