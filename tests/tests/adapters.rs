//! LoRA adapters and per-request merges end to end: the real server answers `adapter_id` and
//! `merged_adapters` requests with the greedy tokens transformers + PEFT produce (goldens from
//! `scripts/goldens/adapter_goldens.py`), keeps every request's tokens when requests over the base
//! model, single adapters and merges share batches, serves `medley merge` output like the
//! on-the-fly merge, and maps adapter errors to the right statuses.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;
use std::process::Command;

use medley_e2e::{
    Server, binaries, fixture_adapters, python_with_lorax_client, tiny_model_dir, token_ids,
    workspace_root,
};
use serde_json::{Value, json};

/// One golden case: an adapter alone, or a PEFT merge of several.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    adapters: Vec<String>,
    weights: Option<Vec<f64>>,
    strategy: Option<String>,
    density: Option<f64>,
    /// Greedy tokens per golden prompt.
    greedy: Vec<Vec<u64>>,
}

struct Goldens {
    prompts: Vec<Vec<u64>>,
    base: Vec<Vec<u64>>,
    cases: Vec<Case>,
}

fn goldens() -> Goldens {
    let dir = workspace_root().join("tests/fixtures/goldens");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_goldens.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join("adapter_goldens.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> Vec<u64> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u64)
            .collect()
    };
    let n = meta["prompts"].as_array().unwrap().len();
    let prompts = (0..n).map(|i| ints(&format!("p{i}.ids"))).collect();
    let base = (0..n).map(|i| ints(&format!("base.p{i}.greedy"))).collect();
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            Case {
                greedy: (0..n)
                    .map(|i| ints(&format!("{name}.p{i}.greedy")))
                    .collect(),
                name,
                adapters: c["adapters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
                weights: c["weights"]
                    .as_array()
                    .map(|w| w.iter().map(|x| x.as_f64().unwrap()).collect()),
                strategy: c["strategy"].as_str().map(str::to_string),
                density: c["density"].as_f64(),
            }
        })
        .collect();
    Goldens {
        prompts,
        base,
        cases,
    }
}

/// Prompt text whose tokenization (with BOS) is `ids`.
fn prompt_text(ids: &[u64]) -> String {
    let tok = tokenizers::Tokenizer::from_file(tiny_model_dir().join("tokenizer.json")).unwrap();
    let ids: Vec<u32> = ids[1..].iter().map(|i| *i as u32).collect();
    tok.decode(&ids, false).unwrap()
}

/// The adapter fields of a case (single adapter or merge), local source.
fn adapter_params(case: &Case) -> Value {
    if case.adapters.len() == 1 {
        return json!({"adapter_id": case.adapters[0], "adapter_source": "local"});
    }
    json!({
        "adapter_source": "local",
        "merged_adapters": {
            "ids": case.adapters,
            "weights": case.weights,
            "merge_strategy": case.strategy,
            "density": case.density,
            "majority_sign_method": "total",
        }
    })
}

fn body(inputs: &str, adapter: &Value, max_new_tokens: u32) -> Value {
    let mut params =
        json!({"max_new_tokens": max_new_tokens, "details": true, "ignore_eos_token": true});
    if let (Some(p), Some(a)) = (params.as_object_mut(), adapter.as_object()) {
        p.extend(a.clone());
    }
    json!({"inputs": inputs, "parameters": params})
}

async fn server_with_root(root: &Path) -> Server {
    Server::with_adapter_root(root).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_and_merges_match_peft_and_survive_mixed_batches() {
    adapters_and_merges_match_peft(1).await;
}

/// The same over tensor-parallel groups: 2 ranks, and 4 (more ranks than the fixture's 2 KV
/// heads, which are then replicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_adapters_and_merges_match_peft() {
    for num_shard in [2, 4] {
        adapters_and_merges_match_peft(num_shard).await;
    }
}

/// Every golden case alone and all of them in mixed batches, served over `num_shard` ranks.
async fn adapters_and_merges_match_peft(num_shard: u32) {
    let g = goldens();
    let s = Server::with_adapter_root_and_shards(&fixture_adapters(), num_shard)
        .await
        .unwrap();
    let texts: Vec<String> = g.prompts.iter().map(|p| prompt_text(p)).collect();
    for (text, ids) in texts.iter().zip(&g.prompts) {
        let got = s.tokenize_ids(text).await.unwrap();
        assert_eq!(
            &got, ids,
            "prompt {text:?} does not tokenize to the golden ids"
        );
    }
    // Alone, one request at a time: PEFT's greedy tokens, and the base model's for no adapter.
    for (i, text) in texts.iter().enumerate() {
        let r = s
            .post("/generate", &body(text, &json!({}), 20))
            .await
            .unwrap();
        assert_eq!(
            token_ids(&r.body),
            g.base[i],
            "base, prompt {i}, {num_shard} shards"
        );
    }
    for case in &g.cases {
        for (i, text) in texts.iter().enumerate() {
            let r = s
                .post("/generate", &body(text, &adapter_params(case), 20))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}: {}", case.name, r.body);
            assert_eq!(
                token_ids(&r.body),
                case.greedy[i],
                "{} prompt {i} vs PEFT, {num_shard} shards",
                case.name
            );
            assert_ne!(
                case.greedy[i], g.base[i],
                "{} must change the output",
                case.name
            );
        }
    }
    // Mixed batches: base, three single adapters and three merges over prompts of several lengths
    // at once; every request gets exactly the tokens it gets alone.
    let mut prompts: Vec<String> = texts.clone();
    prompts.push("The quick brown fox jumps over the lazy dog while the cat sleeps".into());
    prompts.push("SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5; and then some more words to make it long".into());
    let mut kinds: Vec<Value> = vec![json!({})];
    kinds.extend(g.cases.iter().map(adapter_params));
    let mut alone = vec![];
    for p in &prompts {
        for k in &kinds {
            let r = s.post("/generate", &body(p, k, 12)).await.unwrap();
            alone.push(token_ids(&r.body));
        }
    }
    let requests: Vec<Value> = prompts
        .iter()
        .flat_map(|p| kinds.iter().map(move |k| body(p, k, 12)))
        .collect();
    assert!(requests.len() >= 8);
    let together = futures::future::join_all(requests.iter().map(|b| s.post("/generate", b))).await;
    for (i, (r, want)) in together.into_iter().zip(&alone).enumerate() {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            &token_ids(&r.body),
            want,
            "request {i} changed when batched"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_errors_have_the_right_status() {
    let s = server_with_root(&fixture_adapters()).await;
    let cases = [
        (
            json!({"adapter_id": "no_such_adapter", "adapter_source": "local"}),
            404,
            "no_such_adapter",
        ),
        (
            json!({"adapter_source": "local", "merged_adapters": {"ids": ["strong_a_r8", "a_r4"], "weights": [1.0, 1.0], "merge_strategy": "ties", "density": 0.5}}),
            422,
            "cat",
        ),
        (
            json!({"adapter_id": "../tiny-llama", "adapter_source": "local"}),
            422,
            "..",
        ),
        (
            json!({"adapter_source": "local", "merged_adapters": {"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0], "merge_strategy": "ties", "density": 0.5}}),
            422,
            "weights",
        ),
        (
            json!({"adapter_source": "local", "merged_adapters": {"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 1.0], "merge_strategy": "ties"}}),
            422,
            "density",
        ),
        (
            json!({"adapter_source": "local", "merged_adapters": {"ids": ["strong_a_r8", "strong_b_r8_attn"], "weights": [1.0, 1.0], "merge_strategy": "nope"}}),
            422,
            "nope",
        ),
    ];
    for (adapter, status, needle) in cases {
        let r = s
            .post("/generate", &body("Hello", &adapter, 4))
            .await
            .unwrap();
        assert_eq!(r.status, status, "{adapter}: {}", r.body);
        let msg = r.body["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{adapter}: {msg}");
    }
    // A bad adapter fails only its own request: the server keeps serving the rest.
    let r = s
        .post(
            "/generate",
            &body(
                "Hello",
                &json!({"adapter_id": "strong_a_r8", "adapter_source": "local"}),
                4,
            ),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Copies the strong fixture adapters into a fresh adapter root.
fn copy_adapters(root: &Path) {
    for name in ["strong_a_r8", "strong_b_r8_attn", "strong_c_r8_rslora"] {
        let dst = root.join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(fixture_adapters().join(name)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medley_merge_output_serves_like_the_on_the_fly_merge() {
    let g = goldens();
    let root = tempfile::tempdir().unwrap();
    copy_adapters(root.path());
    for strategy in ["ties", "linear", "cat"] {
        let case = g.cases.iter().find(|c| c.name == strategy).unwrap();
        let weights: Vec<String> = case
            .weights
            .as_ref()
            .unwrap()
            .iter()
            .map(|w| w.to_string())
            .collect();
        let adapters: Vec<String> = case
            .adapters
            .iter()
            .map(|a| root.path().join(a).display().to_string())
            .collect();
        let mut cmd = Command::new(binaries().unwrap().join("medley"));
        cmd.arg("merge")
            .arg("--adapters")
            .arg(adapters.join(","))
            .arg("--weights")
            .arg(weights.join(","))
            .arg("--strategy")
            .arg(strategy)
            .arg("--out")
            .arg(root.path().join(format!("merged_{strategy}")));
        if let Some(d) = case.density {
            cmd.arg("--density").arg(d.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = server_with_root(root.path()).await;
    let text = prompt_text(&g.prompts[1]);
    for strategy in ["ties", "linear", "cat"] {
        let case = g.cases.iter().find(|c| c.name == strategy).unwrap();
        let offline =
            json!({"adapter_id": format!("merged_{strategy}"), "adapter_source": "local"});
        let r = s
            .post("/generate", &body(&text, &offline, 20))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            token_ids(&r.body),
            case.greedy[1],
            "medley merge {strategy} vs PEFT"
        );
        let r = s
            .post("/generate", &body(&text, &adapter_params(case), 20))
            .await
            .unwrap();
        assert_eq!(
            token_ids(&r.body),
            case.greedy[1],
            "on-the-fly {strategy} vs PEFT"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorax_client_merged_adapters_work_unchanged() {
    let g = goldens();
    let python = python_with_lorax_client().unwrap();
    let s = server_with_root(&fixture_adapters()).await;
    let case = g.cases.iter().find(|c| c.name == "ties").unwrap().clone();
    let spec = json!({
        "prompt": prompt_text(&g.prompts[0]),
        "ids": case.adapters,
        "weights": case.weights,
        "density": case.density,
        "expected": case.greedy[0],
        "single": {"id": "strong_a_r8", "expected": g.cases[0].greedy[0]},
    });
    let script = workspace_root().join("tests/python/lorax_client_merge.py");
    let http = s.http.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(http)
            .arg(spec.to_string())
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}
