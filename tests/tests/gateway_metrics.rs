//! The inference gateway's view of a replica: `/metrics` parsed by the official Prometheus
//! client's parser while requests run and queue, and after they finish.
//!
//! To hold requests in place, the shard process is stopped (SIGSTOP) once a request is in the
//! running batch: its prefill and every adapter load wait, so the queue, the running batch and
//! the adapter lists can be read at leisure; SIGCONT lets everything finish. The window is kept
//! short (well under the launcher's hang detection, 3 failed health checks 2 s apart).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::{Duration, Instant};

use medley_e2e::prom::Scrape;
use medley_e2e::{Server, ServerOptions, fixture_adapters, tiny_model_dir};
use serde_json::{Value, json};

const NAMED: &str = "team/mix";

async fn server(dir: &std::path::Path) -> Server {
    let merges = dir.join("merges.yaml");
    std::fs::write(
        &merges,
        format!(
            "- name: {NAMED}\n  merged_adapters:\n    ids: [strong_a_r8, strong_b_r8_attn]\n    weights: [1.0, 0.7]\n    merge_strategy: ties\n    density: 0.5\n"
        ),
    )
    .unwrap();
    Server::start(ServerOptions {
        model: Some(tiny_model_dir()),
        args: [
            "--adapter-root",
            &fixture_adapters().display().to_string(),
            "--default-adapter-source",
            "local",
            "--merges",
            &merges.display().to_string(),
            "--max-adapter-slots",
            "4",
            "--max-concurrent-requests",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn inline_merge() -> Value {
    json!({"ids": ["a_r4", "b_r4_alpha16"], "weights": [0.5, 0.5], "merge_strategy": "linear"})
}

/// A finished request: status, `x-affinity-model`, body.
struct Reply {
    status: u16,
    affinity: Option<String>,
    body: Value,
}

async fn post(s: &Server, path: &str, body: Value) -> Reply {
    post_to(s.client.clone(), s.http.clone(), path, body).await
}

async fn post_to(client: reqwest::Client, base: String, path: &str, body: Value) -> Reply {
    let r = client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let affinity = r
        .headers()
        .get("x-affinity-model")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        affinity,
        body,
    }
}

fn generate_body(adapter: Value) -> Value {
    let mut parameters = json!({"max_new_tokens": 6, "ignore_eos_token": true, "details": true});
    parameters
        .as_object_mut()
        .unwrap()
        .extend(adapter.as_object().unwrap().clone());
    json!({"inputs": "Once upon a time", "parameters": parameters})
}

/// The adapter lists of `medley_lora_requests_info` (its one series).
fn lora_lists(scrape: &Scrape) -> (u32, Vec<String>, Vec<String>) {
    let family = scrape
        .family("medley_lora_requests_info")
        .unwrap_or_else(|| panic!("no medley_lora_requests_info in\n{}", scrape.text));
    assert_eq!(family.kind, "gauge");
    assert_eq!(family.samples.len(), 1, "{:?}", family.samples);
    let sample = &family.samples[0];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (sample.value - now).abs() < 60.0,
        "value = update time: {}",
        sample.value
    );
    let list = |k: &str| -> Vec<String> {
        sample.labels[k]
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    (
        sample.labels["max_lora"].parse().unwrap(),
        list("running_lora_adapters"),
        list("waiting_lora_adapters"),
    )
}

/// Scrapes until `done` holds (10 s at most).
async fn scrape_until(s: &Server, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = s.scrape().await.unwrap();
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGCONTs the shard when dropped (also when an assertion fails while it is stopped).
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid = pid as i32;
        // SAFETY: kill(2) on a pid this test's server started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_show_running_and_waiting_adapters_and_merges_to_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;

    // Before any request: the KV block info matches /info's budget; nothing runs or waits.
    let (_, info) = s.get("/info").await.unwrap();
    let info: Value = serde_json::from_str(&info).unwrap();
    let budget = info["max_batch_total_tokens"].as_u64().unwrap();
    let idle = s.scrape().await.unwrap();
    let kv = idle.samples("medley_kv_cache_info", &[]).next().unwrap();
    assert_eq!(kv.labels["block_size"], "16");
    assert_eq!(kv.labels["num_blocks"], budget.div_ceil(16).to_string());
    assert_eq!(lora_lists(&idle), (4, vec![], vec![]));

    // A 422 (validation) while nothing is in flight.
    let bad = post(
        &s,
        "/generate",
        json!({"inputs": "x", "parameters": {"temperature": -1.0}}),
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.body);

    // One adapter resident; its request in the running batch, held there.
    let r = post(&s, "/v1/adapters/preload", json!({"adapter_id": "a_r4"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stopped = Stopped::new(s.shard_pid(0).unwrap());
    let spawn = |path: &'static str, body: Value| {
        tokio::spawn(post_to(s.client.clone(), s.http.clone(), path, body))
    };
    let adapter = spawn("/generate", generate_body(json!({"adapter_id": "a_r4"})));
    scrape_until(&s, "the adapter request runs", |m| {
        m.value("medley_requests_running", &[]) == 1.0
    })
    .await;

    // Three more queue behind it: the base model, a named merge (OpenAI `model`), an inline
    // merge. The merges wait for their load.
    let base = spawn("/generate", generate_body(json!({})));
    let named = spawn(
        "/v1/completions",
        json!({"model": NAMED, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
    );
    let inline = spawn(
        "/generate",
        generate_body(json!({"merged_adapters": inline_merge()})),
    );
    let held = scrape_until(&s, "three requests wait", |m| {
        m.value("medley_requests_waiting", &[]) == 3.0 && lora_lists(m).2.len() == 2
    })
    .await;
    // Every permit is taken: the next request is refused (429).
    let overloaded = post(&s, "/generate", generate_body(json!({}))).await;
    assert_eq!(overloaded.status, 429, "{}", overloaded.body);

    assert_eq!(held.value("medley_requests_running", &[]), 1.0);
    let kv_used = held.value("medley_kv_cache_utilization", &[]);
    assert!(kv_used > 0.0 && kv_used <= 1.0, "{kv_used}");
    let (max_lora, running, waiting) = lora_lists(&held);
    assert_eq!(max_lora, 4);
    assert_eq!(running, vec!["a_r4".to_string()]);
    // The named merge under its name, the inline one under its digest: one name each.
    assert!(waiting.contains(&NAMED.to_string()), "{waiting:?}");
    let digests: Vec<&String> = waiting.iter().filter(|w| w.starts_with("merge:")).collect();
    assert_eq!(digests.len(), 1, "{waiting:?}");
    drop(stopped);

    // Everything finishes; each reply names what it ran on for affinity.
    let replies = [
        adapter.await.unwrap(),
        base.await.unwrap(),
        named.await.unwrap(),
        inline.await.unwrap(),
    ];
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(replies[0].affinity.as_deref(), Some("a_r4"));
    assert_eq!(replies[1].affinity, None);
    assert_eq!(replies[2].affinity.as_deref(), Some(NAMED));
    let inline_label = replies[3].affinity.clone().unwrap();
    assert_eq!(digests, vec![&inline_label]);

    let done = scrape_until(&s, "nothing runs or waits", |m| {
        m.value("medley_requests_running", &[]) == 0.0
            && m.value("medley_requests_waiting", &[]) == 0.0
    })
    .await;
    assert_eq!(done.value("medley_kv_cache_utilization", &[]), 0.0);
    let (_, running, waiting) = lora_lists(&done);
    let mut expected = vec!["a_r4".to_string(), NAMED.to_string(), inline_label.clone()];
    let mut running = running;
    expected.sort();
    running.sort();
    assert_eq!(running, expected);
    assert!(waiting.is_empty(), "{waiting:?}");

    // Counters: 6 requests (4 served, one 422, one 429), each admitted one under its name.
    assert_eq!(done.value("medley_request_count", &[]), 6.0);
    assert_eq!(done.value("medley_request_success", &[]), 4.0);
    assert_eq!(
        done.value("medley_request_failure", &[("err", "validation")]),
        1.0
    );
    assert_eq!(
        done.value("medley_request_failure", &[("err", "overloaded")]),
        1.0
    );
    for label in ["a_r4", "__base_model__", NAMED, &inline_label] {
        assert_eq!(
            done.value("medley_adapter_request_count", &[("adapter", label)]),
            1.0,
            "{label}\n{}",
            done.text
        );
    }
    // Histograms: one time to first token per served request, one time per output token per
    // request with at least two tokens.
    for name in [
        "medley_time_to_first_token_seconds",
        "medley_time_per_output_token_seconds",
    ] {
        assert_eq!(done.family(name).unwrap().kind, "histogram", "{name}");
    }
    assert_eq!(
        done.histogram_count("medley_time_to_first_token_seconds"),
        4.0
    );
    let multi_token = replies
        .iter()
        .filter(|r| {
            let n = r.body["details"]["generated_tokens"]
                .as_u64()
                .or(r.body["usage"]["completion_tokens"].as_u64())
                .unwrap();
            n >= 2
        })
        .count();
    assert_eq!(
        done.histogram_count("medley_time_per_output_token_seconds"),
        multi_token as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_is_routable_by_its_digest_label() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path()).await;
    let complete = |model: &str, merge: Option<Value>| {
        let mut body = json!({"model": model, "prompt": "Once upon a time", "max_tokens": 4,
                              "temperature": 0});
        if let Some(m) = merge {
            body["merged_adapters"] = m;
        }
        post(&s, "/v1/completions", body)
    };

    // The inline merge's label comes back in the response headers ...
    let first = post(
        &s,
        "/generate",
        generate_body(json!({"merged_adapters": inline_merge()})),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let label = first.affinity.unwrap();
    assert!(label.starts_with("merge:") && label.len() == 18, "{label}");
    // ... and goes in `model` with the merge it labels (what a gateway routes on).
    let routed = complete(&label, Some(inline_merge())).await;
    assert_eq!(routed.status, 200, "{}", routed.body);
    assert_eq!(routed.affinity.as_deref(), Some(label.as_str()));
    // Alone, a digest only resolves through a named merge.
    let alone = complete(&label, None).await;
    assert_eq!(alone.status, 404, "{}", alone.body);
    assert_eq!(alone.body["error"]["code"], "model_not_found");
    // A named merge's digest (`key` in the merges API) resolves to it, and is told its name:
    // the one name /metrics lists it under.
    let named = complete(NAMED, None).await;
    assert_eq!(named.status, 200, "{}", named.body);
    assert_eq!(named.affinity.as_deref(), Some(NAMED));
    let (_, merge) = s.get(&format!("/v1/merges/{NAMED}")).await.unwrap();
    let merge: Value = serde_json::from_str(&merge).unwrap();
    let named_digest = format!("merge:{}", merge["key"].as_str().unwrap());
    let by_digest = complete(&named_digest, None).await;
    assert_eq!(by_digest.status, 200, "{}", by_digest.body);
    assert_eq!(by_digest.affinity.as_deref(), Some(NAMED));
    assert_eq!(
        by_digest.body["choices"][0]["text"],
        named.body["choices"][0]["text"]
    );
    let (_, running, _) = lora_lists(&s.scrape().await.unwrap());
    assert!(
        running.contains(&NAMED.to_string()) && running.contains(&label),
        "{running:?}"
    );
    // A digest that is not the merge's is refused (400: OpenAI's invalid request).
    let wrong = complete("merge:000000000000", Some(inline_merge())).await;
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    assert!(
        wrong.body.to_string().contains(&label),
        "names the right digest: {}",
        wrong.body
    );
}
