//! The Llama forward pass against transformers goldens (committed outputs of
//! `scripts/goldens/forward_goldens.py`; no Python needed here), plus batching, LoRA-hook,
//! checkpoint-error and sharded-checkpoint checks on the tiny fixtures (f32 committed, bf16 made by
//! code at test time).

// Helpers outside `#[test]` functions are test code too.
#![allow(clippy::unwrap_used)]

mod engine_harness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use engine_harness::{argmax, fixtures, max_abs_diff, tiny};
use medley_shard::fixture::{FixtureDType, ModelFixture, write_model};
use medley_shard::kv_cache::{KvCache, KvCacheConfig};
use medley_shard::model::{
    ForwardBatch, LlamaModel, LoadOptions, LoraDelta, ModelError, NoLora, RowSlots, SeqChunk,
    TargetModule,
};

/// SHA-256 of the bf16 fixture's `model.safetensors` the goldens were computed on. The fixture is
/// not committed (it is made by code); if the generator changes, this check fails first: rerun
/// `medley-fixture model --preset tiny --dtype bf16 --llama3-rope --tie-embeddings` and
/// `scripts/goldens/forward_goldens.py` (see scripts/goldens/README.md) and update the hash.
const BF16_FIXTURE_SHA256: &str =
    "146fda5532e5c58a4f0910e0c970655a5a5659f1dd992b37df02bb1e345ea858";

/// The bf16 fixture (llama3 RoPE scaling, tied embeddings), generated once per test process.
fn bf16_fixture() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let mut fx = ModelFixture::tiny(FixtureDType::BF16);
        fx.config.rope_scaling = Some(medley_shard::fixture::llama3_rope_scaling());
        fx.config.tie_word_embeddings = true;
        write_model(dir.path(), &fx).unwrap();
        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&weights)),
            BF16_FIXTURE_SHA256,
            "the bf16 fixture generator changed: regenerate the goldens"
        );
        dir
    })
    .path()
}

fn load(dir: &Path) -> LlamaModel {
    LlamaModel::load(dir, &LoadOptions::default()).unwrap()
}

fn kv_for(model: &LlamaModel) -> KvCache {
    KvCache::new(
        model.config(),
        model.dtype(),
        model.device(),
        KvCacheConfig::tokens(4096),
    )
    .unwrap()
}

fn chunk(seq_id: u64, tokens: Vec<u32>, start_pos: usize, all_logits: bool) -> SeqChunk {
    SeqChunk {
        seq_id,
        tokens,
        start_pos,
        adapter_slot: 0,
        all_logits,
    }
}

fn step(model: &LlamaModel, kv: &mut KvCache, chunks: Vec<SeqChunk>) -> Vec<Vec<f32>> {
    model
        .forward(&ForwardBatch { chunks }, kv, &NoLora)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Largest `|a - b|` and whether every element is within `tol(b)` of the reference `b`.
fn compare(a: &[f32], b: &[f32], tol: impl Fn(f32) -> f32) -> (f32, bool) {
    assert_eq!(a.len(), b.len());
    let ok = a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol(*y));
    (max_abs_diff(a, b), ok)
}

struct Golden {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    greedy_logits: Vec<Vec<f32>>,
}

fn goldens(name: &str) -> Vec<Golden> {
    let path = fixtures().join(format!("goldens/forward_{name}.safetensors"));
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        t[k].to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let f32s = |k: &str| t[k].to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    (0..)
        .take_while(|i| t.contains_key(&format!("p{i}.ids")))
        .map(|i| Golden {
            ids: ids(&format!("p{i}.ids")),
            logits: f32s(&format!("p{i}.logits")),
            greedy: ids(&format!("p{i}.greedy")),
            greedy_logits: f32s(&format!("p{i}.greedy_logits")),
        })
        .collect()
}

/// Runs every golden prompt (full-prompt logits, then greedy decoding one token per step through
/// the KV cache), asserting every logit within `tol(reference)` and identical greedy tokens.
fn check_goldens(model: &LlamaModel, name: &str, tol: impl Fn(f32) -> f32) {
    let gs = goldens(name);
    assert!(gs.len() >= 3);
    let (mut worst_prompt, mut worst_greedy) = (0f32, 0f32);
    let mut all_within = true;
    let mut kv = kv_for(model);
    for (i, g) in gs.iter().enumerate() {
        let seq = i as u64;
        kv.allocate(seq, g.ids.len() + g.greedy.len()).unwrap();
        let rows = step(model, &mut kv, vec![chunk(seq, g.ids.clone(), 0, true)]);
        assert_eq!(rows.len(), g.ids.len());
        for (r, want) in rows.iter().zip(&g.logits) {
            let (d, ok) = compare(r, want, &tol);
            worst_prompt = worst_prompt.max(d);
            all_within &= ok;
        }
        let mut last = rows.last().unwrap().clone();
        let mut pos = g.ids.len();
        for (s, want_tok) in g.greedy.iter().enumerate() {
            let (d, ok) = compare(&last, &g.greedy_logits[s], &tol);
            worst_greedy = worst_greedy.max(d);
            all_within &= ok;
            assert_eq!(
                argmax(&last),
                *want_tok,
                "{name} prompt {i}: greedy step {s} differs"
            );
            if s + 1 < g.greedy.len() {
                last = step(
                    model,
                    &mut kv,
                    vec![chunk(seq, vec![*want_tok], pos, false)],
                )
                .remove(0);
                pos += 1;
            }
        }
        assert_eq!(kv.len(seq), Some(pos));
        kv.free(seq);
    }
    eprintln!(
        "{name}: max |logit error| prompt {worst_prompt:.3e}, greedy steps {worst_greedy:.3e}"
    );
    assert!(all_within, "{name}: logits beyond tolerance");
}

/// f32 against transformers in float32 (eager attention): both sides evaluate the same f32
/// formulas and differ only in summation order and libm ulps, so 1e-4 on logits of magnitude ~10
/// is ~1e-5 relative.
#[test]
fn f32_matches_transformers() {
    let model = load(&tiny());
    assert_eq!(model.dtype(), DType::F32);
    check_goldens(&model, "f32", |_| 1e-4);
}

/// bf16 (llama3 RoPE scaling, tied embeddings) against transformers in bfloat16 (eager attention).
/// Both sides round to bf16 at the same points (every matmul output with f32 accumulation,
/// RMSNorm/SiLU/softmax in f32 then rounded, cos/sin rounded, residual adds in bf16), so they
/// agree unless an f32 accumulation-order difference moves a value across a bf16 rounding
/// boundary. Measured on the development machine: max error 2.4e-7 (bit-identical except two
/// near-zero logits). Such a flip is one bf16 step (2^-8 relative) of one activation; it
/// perturbs the logits far less than their own final bf16 rounding, whose step is 0.25 at the
/// largest |logit| (~54). The bound is therefore one bf16 step of the reference logit plus 0.01:
/// robust to other CPUs' gemm kernels, yet the same weights computed in f32 (transformers) break
/// it in ~40% of the elements, by up to 20x.
#[test]
fn bf16_matches_transformers() {
    let model = load(bf16_fixture());
    assert_eq!(model.dtype(), DType::BF16);
    assert!(model.config().tie_word_embeddings && model.config().rope_scaling.is_some());
    check_goldens(&model, "bf16", |r| bf16_step(r) + 0.01);
}

/// The spacing of bf16 values around `x` (8 significant bits).
fn bf16_step(x: f32) -> f32 {
    let x = x.abs().max(f32::MIN_POSITIVE);
    2f32.powi(x.log2().floor() as i32 - 7)
}

/// Mistral's sliding window (5 tokens, prompt of 19): the f32 fixture's weights run as
/// `MistralForCausalLM` in transformers. Same f32 numerics as `f32_matches_transformers`, so the
/// same 1e-4 bound; greedy decoding goes through the KV cache past the window.
#[test]
fn mistral_sliding_window_matches_transformers() {
    let dir = broken_copy(
        |c| {
            c["model_type"] = "mistral".into();
            c["sliding_window"] = 5.into();
        },
        |_| {},
    );
    let model = load(dir.path());
    assert_eq!(model.config().sliding_window, Some(5));
    let path = fixtures().join("goldens/forward_mistral_sw.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let ids: Vec<u32> = t["p0.ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|x| *x as u32)
        .collect();
    let greedy: Vec<u32> = t["p0.greedy"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|x| *x as u32)
        .collect();
    let want = t["p0.logits"].to_vec2::<f32>().unwrap();
    let mut kv = kv_for(&model);
    kv.allocate(0, ids.len() + greedy.len()).unwrap();
    let rows = step(&model, &mut kv, vec![chunk(0, ids.clone(), 0, true)]);
    let worst = rows
        .iter()
        .zip(&want)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    eprintln!("mistral sliding window: max |logit error| {worst:.3e}");
    assert!(worst <= 1e-4, "sliding-window logits off by {worst}");
    let mut next = argmax(rows.last().unwrap());
    for (s, want_tok) in greedy.iter().enumerate() {
        assert_eq!(next, *want_tok, "greedy step {s}");
        let pos = ids.len() + s;
        next = argmax(&step(&model, &mut kv, vec![chunk(0, vec![next], pos, false)])[0]);
    }
}

/// Several sequences of different lengths in one step — chunked prefill mixed with decode steps —
/// give the logits of running each sequence alone. Only gemm blocking (row count) differs, so
/// f32 results agree to ~1e-6; 1e-5 is the bound.
#[test]
fn ragged_batch_matches_sequential() {
    let model = load(&tiny());
    let prompts: [Vec<u32>; 3] = [
        (3..10).collect(),
        vec![1, 77, 300],
        (0..12).map(|i| 1 + (i * 37) % 500).collect(),
    ];
    let follow: [u32; 3] = [5, 9, 11];
    // Alone: prefill, then two decode steps.
    let mut alone = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let mut kv = kv_for(&model);
        kv.allocate(0, 64).unwrap();
        let mut rows = step(&model, &mut kv, vec![chunk(0, p.clone(), 0, true)]);
        let n = p.len();
        rows.extend(step(
            &model,
            &mut kv,
            vec![chunk(0, vec![follow[i]], n, false)],
        ));
        rows.extend(step(
            &model,
            &mut kv,
            vec![chunk(0, vec![follow[i] + 1], n + 1, false)],
        ));
        alone.push(rows);
    }
    // Batched: step 1 prefills seq 0 and the first half of seq 2's prompt; step 2 decodes seq 0,
    // prefills seq 1 and the rest of seq 2; step 3 decodes all three; step 4 decodes 1 and 2.
    let mut kv = kv_for(&model);
    for s in 0..3 {
        kv.allocate(s, 64).unwrap();
    }
    let (p0, p1, p2) = (&prompts[0], &prompts[1], &prompts[2]);
    let r1 = step(
        &model,
        &mut kv,
        vec![
            chunk(0, p0.clone(), 0, true),
            chunk(2, p2[..5].to_vec(), 0, true),
        ],
    );
    let r2 = step(
        &model,
        &mut kv,
        vec![
            chunk(1, p1.clone(), 0, true),
            chunk(0, vec![follow[0]], p0.len(), false),
            chunk(2, p2[5..].to_vec(), 5, true),
        ],
    );
    let r3 = step(
        &model,
        &mut kv,
        vec![
            chunk(2, vec![follow[2]], p2.len(), false),
            chunk(0, vec![follow[0] + 1], p0.len() + 1, false),
            chunk(1, vec![follow[1]], p1.len(), false),
        ],
    );
    let r4 = step(
        &model,
        &mut kv,
        vec![
            chunk(1, vec![follow[1] + 1], p1.len() + 1, false),
            chunk(2, vec![follow[2] + 1], p2.len() + 1, false),
        ],
    );
    let (n0, n1, n2) = (p0.len(), p1.len(), p2.len());
    let batched: [Vec<Vec<f32>>; 3] = [
        [&r1[..n0], &r2[n1..n1 + 1], &r3[1..2]].concat(),
        [&r2[..n1], &r3[2..3], &r4[..1]].concat(),
        [&r1[n0..], &r2[n1 + 1..], &r3[..1], &r4[1..]].concat(),
    ];
    let mut worst = 0f32;
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            worst = worst.max(max_abs_diff(x, y));
        }
    }
    eprintln!("ragged vs sequential: max |diff| {worst:.3e}");
    assert!(worst <= 1e-5, "ragged batch differs by {worst}");
    assert_eq!(
        (kv.len(0), kv.len(1), kv.len(2)),
        (Some(n0 + 2), Some(n1 + 2), Some(n2 + 2))
    );
}

/// One recorded hook call: layer, module, dims of `x`, dims of `y`, row slots.
type Call = (usize, TargetModule, Vec<usize>, Vec<usize>, Vec<u32>);

/// Records every LoRA hook call and adds 1.0 to the `down_proj` output of rows with slot 2.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
}

impl LoraDelta for Recorder {
    fn apply(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        y: Tensor,
        rows: &RowSlots,
    ) -> candle_core::Result<Tensor> {
        let row_slots = rows.slots();
        self.calls.lock().unwrap().push((
            layer,
            module,
            x.dims().to_vec(),
            y.dims().to_vec(),
            row_slots.to_vec(),
        ));
        if module != TargetModule::Down {
            return Ok(y);
        }
        let mask: Vec<f32> = row_slots
            .iter()
            .map(|s| if *s == 2 { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (row_slots.len(), 1), y.device())?.to_dtype(y.dtype())?;
        y.broadcast_add(&mask)
    }
}

#[test]
fn lora_hook_sees_every_projection_and_row_slots() {
    let model = load(&tiny());
    let cfg = model.config().clone();
    let mut kv = kv_for(&model);
    kv.allocate(1, 16).unwrap();
    kv.allocate(2, 16).unwrap();
    let batch = |slot_b| ForwardBatch {
        chunks: vec![
            chunk(1, vec![1, 2, 3], 0, false),
            SeqChunk {
                adapter_slot: slot_b,
                ..chunk(2, vec![4, 5], 0, false)
            },
        ],
    };
    let rec = Recorder::default();
    let with = model
        .forward(&batch(2), &mut kv, &rec)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 7 * cfg.num_hidden_layers);
    for (i, (layer, module, xd, yd, slots)) in calls.iter().enumerate() {
        assert_eq!(*layer, i / 7);
        assert_eq!(*module, TargetModule::ALL[i % 7]);
        assert_eq!(slots, &vec![0, 0, 0, 2, 2]);
        assert_eq!((xd[0], yd[0]), (5, 5), "all rows of the batch in one call");
        let out = match module {
            TargetModule::Q => cfg.q_size(),
            TargetModule::K | TargetModule::V => cfg.kv_size(),
            TargetModule::O | TargetModule::Down => cfg.hidden_size,
            TargetModule::Gate | TargetModule::Up => cfg.intermediate_size,
        };
        assert_eq!(yd[1], out, "{module:?}");
    }
    kv.free(1);
    kv.free(2);
    kv.allocate(1, 16).unwrap();
    kv.allocate(2, 16).unwrap();
    let base = model
        .forward(&batch(0), &mut kv, &NoLora)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(&with[0], &base[0]) < 1e-6,
        "slot-0 rows untouched"
    );
    assert!(
        max_abs_diff(&with[1], &base[1]) > 1e-2,
        "slot-2 rows changed"
    );
}

#[test]
fn invalid_batches_are_errors_and_leave_the_cache_unchanged() {
    let model = load(&tiny());
    let mut kv = kv_for(&model);
    kv.allocate(1, 4).unwrap();
    step(&model, &mut kv, vec![chunk(1, vec![1, 2], 0, false)]);
    let cases = [
        vec![],
        vec![chunk(1, vec![], 2, false)],
        vec![chunk(1, vec![3], 1, false)],
        vec![chunk(9, vec![3], 0, false)],
        vec![chunk(1, vec![512], 2, false)],
        vec![chunk(1, vec![3, 4, 5], 2, false)],
        vec![chunk(1, vec![3], 2, false), chunk(1, vec![4], 3, false)],
    ];
    for chunks in cases {
        let err = model.forward(
            &ForwardBatch {
                chunks: chunks.clone(),
            },
            &mut kv,
            &NoLora,
        );
        assert!(
            matches!(
                err,
                Err(ModelError::InvalidBatch(_) | ModelError::KvCache(_))
            ),
            "{chunks:?}: {err:?}"
        );
        assert_eq!(kv.len(1), Some(2));
    }
    let other = KvCache::new(
        model.config(),
        DType::F16,
        &Device::Cpu,
        KvCacheConfig::tokens(16),
    )
    .unwrap();
    let mut other = other;
    other.allocate(1, 4).unwrap();
    assert!(
        model
            .forward(
                &ForwardBatch {
                    chunks: vec![chunk(1, vec![1], 0, false)]
                },
                &mut other,
                &NoLora
            )
            .is_err()
    );
}

/// Copies the f32 fixture's config and weights into a temp dir, letting `edit` change them.
fn broken_copy(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let try_load = |d: &tempfile::TempDir| LlamaModel::load(d.path(), &LoadOptions::default());
    let d = broken_copy(
        |_| {},
        |t| {
            t.remove("model.layers.1.mlp.up_proj.weight");
        },
    );
    match try_load(&d) {
        Err(ModelError::MissingTensor { name }) => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight")
        }
        other => panic!("{other:?}"),
    }
    let d = broken_copy(
        |_| {},
        |t| {
            t.insert(
                "model.layers.0.self_attn.k_proj.weight".into(),
                Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
            );
        },
    );
    match try_load(&d) {
        Err(ModelError::WrongShape {
            name,
            expected,
            actual,
        }) => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!((expected, actual), (vec![32, 64], vec![64, 64]));
        }
        other => panic!("{other:?}"),
    }
    let d = broken_copy(
        |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        |_| {},
    );
    assert!(matches!(try_load(&d), Err(ModelError::Unsupported(m)) if m.contains("yarn")));
    let d = broken_copy(
        |c| c["tie_word_embeddings"] = true.into(),
        |t| {
            t.remove("lm_head.weight");
        },
    );
    assert!(try_load(&d).is_ok(), "tied models need no lm_head");
    let d = broken_copy(
        |_| {},
        |t| {
            t.remove("lm_head.weight");
        },
    );
    assert!(
        matches!(try_load(&d), Err(ModelError::MissingTensor { name }) if name == "lm_head.weight")
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(try_load(&empty), Err(ModelError::Io { .. })));
    std::fs::copy(
        fixtures().join("tiny-llama/config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    assert!(matches!(try_load(&empty), Err(ModelError::Weights(_))));
}

/// The same seed written as several shards gives bit-identical logits.
#[test]
fn sharded_checkpoint_matches_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = ModelFixture::tiny(FixtureDType::F32);
    fx.max_shard_bytes = Some(150_000);
    write_model(dir.path(), &fx).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").exists());
    assert!(!dir.path().join("model.safetensors").exists());
    let sharded = load(dir.path());
    let single = load(&tiny());
    let tokens: Vec<u32> = (1..20).collect();
    let run = |m: &LlamaModel| {
        let mut kv = kv_for(m);
        kv.allocate(0, 32).unwrap();
        step(m, &mut kv, vec![chunk(0, tokens.clone(), 0, true)])
    };
    assert_eq!(run(&sharded), run(&single));
}
