//! A small affinity-routing client, standing in for an inference gateway's endpoint picker: it
//! reads each replica's `/metrics` (the adapter info gauge, queue and running counts) and sends
//! a request for `model` to a replica that already holds it; [`Policy::RoundRobin`] is the
//! baseline it is measured against.
//!
//! The choice, in order (like the reference picker's LoRA affinity, then load):
//! 1. replicas where `model` is in `running_lora_adapters` (resident: no load, no merge);
//! 2. else where it is in `waiting_lora_adapters` (its load is under way);
//! 3. else replicas with a free adapter slot (`max_lora` above running + waiting);
//! 4. else every replica;
//!
//! and among them the least loaded (waiting + running requests), ties broken round-robin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

use crate::Server;

/// How requests are spread over replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One replica after the other, whatever the model.
    RoundRobin,
    /// By the adapter info gauge (see the module docs).
    Affinity,
}

/// What one replica's `/metrics` says about where adapters are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaView {
    /// `max_lora`.
    pub max_lora: usize,
    /// `running_lora_adapters`.
    pub running: Vec<String>,
    /// `waiting_lora_adapters`.
    pub waiting: Vec<String>,
    /// `medley_requests_waiting` + `medley_requests_running`.
    pub load: f64,
}

impl ReplicaView {
    /// Reads Prometheus exposition text (the three series it needs; in process, since it runs
    /// before every routing decision: the e2e metrics tests check the whole text with the
    /// official parser).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let samples: Vec<(&str, BTreeMap<String, String>, f64)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| parse_sample(l).with_context(|| format!("unparsable sample line {l:?}")))
            .collect::<anyhow::Result<_>>()?;
        let sample = |name: &str| samples.iter().find(|s| s.0 == name);
        let gauge = |name: &str| sample(name).map_or(0.0, |s| s.2);
        let info = sample("medley_lora_requests_info");
        let label = |k: &str| info.and_then(|s| s.1.get(k)).map_or("", String::as_str);
        let list = |k: &str| -> Vec<String> {
            label(k)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        Ok(Self {
            max_lora: label("max_lora").parse().unwrap_or(0),
            running: list("running_lora_adapters"),
            waiting: list("waiting_lora_adapters"),
            load: gauge("medley_requests_waiting") + gauge("medley_requests_running"),
        })
    }

    /// Scrapes `replica`.
    pub async fn scrape(replica: &Server) -> anyhow::Result<Self> {
        let (status, text) = replica.get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Self::parse(&text)
    }
}

/// One sample line: name, labels (quoted values with `\\`, `\"` and `\n` escapes), value.
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => value.push(match chars.next()?.1 {
                                'n' => '\n',
                                other => other,
                            }),
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// Picks a replica for each request.
#[derive(Debug)]
pub struct Router {
    policy: Policy,
    next: AtomicUsize,
}

impl Router {
    /// A router with `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// The replica (index into `views`) for a request naming `model`.
    pub fn pick(&self, model: &str, views: &[ReplicaView]) -> usize {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.policy == Policy::RoundRobin || views.is_empty() {
            return turn % views.len().max(1);
        }
        let all: Vec<usize> = (0..views.len()).collect();
        let with = |f: &dyn Fn(&ReplicaView) -> bool| -> Vec<usize> {
            all.iter().copied().filter(|i| f(&views[*i])).collect()
        };
        let candidates = [
            with(&|v| v.running.iter().any(|m| m == model)),
            with(&|v| v.waiting.iter().any(|m| m == model)),
            with(&|v| v.running.len() + v.waiting.len() < v.max_lora),
            all.clone(),
        ]
        .into_iter()
        .find(|c| !c.is_empty())
        .unwrap_or(all);
        let least = candidates
            .iter()
            .map(|i| views[*i].load)
            .fold(f64::INFINITY, f64::min);
        let best: Vec<usize> = candidates
            .into_iter()
            .filter(|i| views[*i].load == least)
            .collect();
        best[turn % best.len()]
    }

    /// Scrapes every replica and picks one for `model` (the affinity policy reads the gauges;
    /// round-robin reads nothing).
    pub async fn route(&self, model: &str, replicas: &[Server]) -> anyhow::Result<usize> {
        if self.policy == Policy::RoundRobin {
            return Ok(self.next.fetch_add(1, Ordering::Relaxed) % replicas.len().max(1));
        }
        let views = futures::future::try_join_all(replicas.iter().map(ReplicaView::scrape)).await?;
        Ok(self.pick(model, &views))
    }
}

/// `n` named merges of the fixture adapters (`mix-0` ... ), TIES with distinct weights, as a
/// `--merges` YAML file.
pub fn merges_yaml(n: usize) -> (Vec<String>, String) {
    let names: Vec<String> = (0..n).map(|i| format!("mix-{i}")).collect();
    let yaml = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "- name: {name}\n  merged_adapters:\n    ids: [strong_a_r8, strong_b_r8_attn]\n    weights: [1.0, {:.2}]\n    merge_strategy: ties\n    density: 0.5\n",
                0.1 + 0.1 * i as f64
            )
        })
        .collect();
    (names, yaml)
}

/// Starts `n` replicas (each `medley serve`: a router and its shard) of the tiny model with the
/// fixture adapters, `slots` adapter slots each, and the merges of `merges_file`.
pub async fn start_replicas(
    n: usize,
    slots: u32,
    merges_file: &std::path::Path,
) -> anyhow::Result<Vec<Server>> {
    let mut replicas = Vec::with_capacity(n);
    for _ in 0..n {
        replicas.push(
            Server::start(crate::ServerOptions {
                model: Some(crate::tiny_model_dir()),
                args: vec![
                    "--adapter-root".into(),
                    crate::fixture_adapters().display().to_string(),
                    "--default-adapter-source".into(),
                    "local".into(),
                    "--merges".into(),
                    merges_file.display().to_string(),
                    "--max-adapter-slots".into(),
                    slots.to_string(),
                ],
                ..Default::default()
            })
            .await?,
        );
    }
    Ok(replicas)
}

/// Merges computed over all replicas so far and the seconds they took
/// (`medley_adapter_merge_duration`: count and sum).
pub async fn merges_computed(replicas: &[Server]) -> anyhow::Result<(f64, f64)> {
    let (mut count, mut seconds) = (0.0, 0.0);
    for r in replicas {
        let scrape = r.scrape().await?;
        count += scrape.histogram_count("medley_adapter_merge_duration");
        seconds += scrape
            .samples("medley_adapter_merge_duration", &[])
            .filter(|s| s.name == "medley_adapter_merge_duration_sum")
            .map(|s| s.value)
            .sum::<f64>();
    }
    Ok((count, seconds))
}

/// What a workload cost.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Requests sent (all answered 200).
    pub requests: usize,
    /// Merges computed over all replicas during the workload.
    pub merges: f64,
    /// Seconds the shards spent computing those merges.
    pub merge_seconds: f64,
    /// Wall time.
    pub wall: std::time::Duration,
    /// Mean request latency (routing included).
    pub mean_latency: std::time::Duration,
}

/// Sends one `/v1/completions` per entry of `models` (in order, `concurrency` at a time), each
/// to the replica `policy` picks, and counts the merges computed meanwhile.
pub async fn run_workload(
    policy: Policy,
    replicas: &[Server],
    models: &[String],
    concurrency: usize,
    max_tokens: u32,
) -> anyhow::Result<Outcome> {
    use futures::StreamExt;
    let before = merges_computed(replicas).await?;
    let router = Router::new(policy);
    let start = std::time::Instant::now();
    let latencies: Vec<anyhow::Result<std::time::Duration>> =
        futures::stream::iter(models.iter().map(|model| {
            let router = &router;
            async move {
                let t = std::time::Instant::now();
                let i = router.route(model, replicas).await?;
                let r = replicas[i]
                    .post(
                        "/v1/completions",
                        &serde_json::json!({"model": model, "prompt": "Once upon a time",
                                            "max_tokens": max_tokens, "temperature": 0}),
                    )
                    .await?;
                anyhow::ensure!(r.status == 200, "{model} on replica {i}: {}", r.body);
                Ok(t.elapsed())
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let wall = start.elapsed();
    let after = merges_computed(replicas).await?;
    let latencies = latencies.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let total: std::time::Duration = latencies.iter().sum();
    Ok(Outcome {
        requests: latencies.len(),
        merges: after.0 - before.0,
        merge_seconds: after.1 - before.1,
        wall,
        mean_latency: total / u32::try_from(latencies.len().max(1)).unwrap_or(u32::MAX),
    })
}

/// `rounds` passes over `names`, each pass in an order shuffled by `seed` (xorshift).
pub fn shuffled_rounds(names: &[String], rounds: usize, seed: u64) -> Vec<String> {
    let mut state = seed.max(1);
    let mut out = Vec::with_capacity(names.len() * rounds);
    for _ in 0..rounds {
        let mut pass = names.to_vec();
        for i in (1..pass.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            pass.swap(i, (state % (i as u64 + 1)) as usize);
        }
        out.extend(pass);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(running: &[&str], waiting: &[&str], load: f64) -> ReplicaView {
        ReplicaView {
            max_lora: 2,
            running: running.iter().map(|s| s.to_string()).collect(),
            waiting: waiting.iter().map(|s| s.to_string()).collect(),
            load,
        }
    }

    #[test]
    fn affinity_prefers_resident_then_loading_then_free_slots_then_load() {
        let r = Router::new(Policy::Affinity);
        let views = [
            view(&["m1", "m2"], &[], 5.0),
            view(&["m3"], &["m4"], 0.0),
            view(&[], &[], 1.0),
        ];
        assert_eq!(r.pick("m2", &views), 0);
        assert_eq!(r.pick("m4", &views), 1);
        // Not held anywhere: a replica with a free slot, the least loaded one.
        assert_eq!(r.pick("m9", &views), 2);
        let full = [view(&["a", "b"], &[], 3.0), view(&["c", "d"], &[], 1.0)];
        assert_eq!(r.pick("m9", &full), 1);
    }

    #[test]
    fn views_parse_the_gauges() {
        let text = "# TYPE medley_requests_waiting gauge\nmedley_requests_waiting 2\n\
                    # TYPE medley_requests_running gauge\nmedley_requests_running 3\n\
                    # TYPE medley_lora_requests_info gauge\n\
                    medley_lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,merge:0123456789ab\",waiting_lora_adapters=\"\"} 1.7e9\n\
                    odd{x=\"q\\\"u\\\\o\\nte,}\"} +Inf\n";
        let v = ReplicaView::parse(text).unwrap();
        assert_eq!(
            v,
            ReplicaView {
                max_lora: 4,
                running: vec!["a".into(), "merge:0123456789ab".into()],
                waiting: vec![],
                load: 5.0,
            }
        );
        let (name, labels, value) = parse_sample("odd{x=\"q\\\"u\\\\o\\nte,}\"} +Inf").unwrap();
        assert_eq!((name, value), ("odd", f64::INFINITY));
        assert_eq!(labels["x"], "q\"u\\o\nte,}");
        assert!(parse_sample("broken{x=\"open").is_none());
    }

    #[test]
    fn rounds_hold_every_name_once_per_pass() {
        let names: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
        let order = shuffled_rounds(&names, 3, 7);
        assert_eq!(order.len(), 24);
        for pass in order.chunks(8) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(p, names);
        }
        assert_eq!(order, shuffled_rounds(&names, 3, 7));
        assert_ne!(order[..8], names[..]);
    }

    #[test]
    fn round_robin_ignores_the_gauges() {
        let r = Router::new(Policy::RoundRobin);
        let views = [view(&["m"], &[], 0.0), view(&[], &[], 0.0)];
        let picks: Vec<usize> = (0..4).map(|_| r.pick("m", &views)).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }
}
