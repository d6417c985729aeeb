//! The demo pipeline (`medley-train demo`): the demo tokenizer and base corpus from `medley-demo`,
//! pretraining of the base, one LoRA adapter per task, the files Medley serves, and a quick
//! greedy exact-match check of the base, each adapter and their merge.
//!
//! # Choices that keep the adapters mergeable
//!
//! The demo merges the three adapters per request and should keep most of each one's score.
//! Merged updates interfere where two adapters change the same directions for the same inputs,
//! so each adapter should change the model as little as possible outside its own prompt format.
//! Every knob is a field of [`DemoConfig`] (and a `medley-train demo`/`lora` flag):
//!
//! * **Modest rank** ([`crate::lora::LoraConfig::rank`], 8; `alpha` 16): small updates with little room for
//!   incidental changes. `instruct`, six kinds of instruction in one adapter, gets rank 16
//!   ([`DemoConfig::task_lora`]): at rank 8 it tops out at 67-75% alone.
//! * **LoRA dropout** ([`crate::lora::LoraConfig::dropout`], 0.05) and **weight decay** on `A` and `B`
//!   ([`crate::optim::OptimConfig::weight_decay`] of `lora_train`, 0.05): smaller, less idiosyncratic factors.
//! * **Anchoring** ([`AnchorMix`]): each step adds `weight · KL(base ‖ base + adapter)` on a batch
//!   of other text — base-corpus windows and the *other* tasks' examples (prompt and
//!   completion) — whose targets are the frozen base's own predictions. The adapter thus learns
//!   to leave those inputs alone, which is what a merge needs: on an `ad` prompt the `sql`
//!   adapter's share of the merged update should be ~0.
//! * **Train alone, then tune inside the merge** ([`crate::adapters`]): each adapter first
//!   trains on its own task (the three concurrently, uniform batches, `instruct` four times as long);
//!   alone they reach 100% on `sql` and `ad` but their `cat` merge scores 0, each rewriting the
//!   others' prompts. A short merge-aware co-training follows ([`DemoConfig::merge_tune`]): each
//!   adapter learns its task both alone and with the other two's current updates added
//!   ([`crate::train::train_loras`]), so their `cat` merge keeps each one's skill.
//! * **A base that copies from its context.** Every task copies values from its prompt; on a
//!   base that cannot, adapters learn each task's template and fill it with the most common
//!   values (the first demo: 3-13% exact match). Copying does not emerge from the mixed corpus
//!   in a short pretraining (measured with the same model in PyTorch as well), so pretraining
//!   starts with a stage of list copies alone ([`DemoConfig::copy_stage_steps`]), then keeps a
//!   share of them in the corpus ([`DemoConfig::copy_docs`]) beside repeated documents
//!   ([`DemoConfig::repeat_docs`]); the pretraining log shows the [`CopyProbe`] accuracy.
//!
//! The closing check scores PEFT's `cat` merge with weight 1 each (the exact sum of the three
//! updates, [`LoraSet::concat`]); `medley eval` measures the merges Medley serves.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use medley_demo::tokenizer::{EOS_ID, TokenizerOptions, encode_example, write_tokenizer};
use medley_demo::{Split, Task, generate};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::TrainError;
use crate::adapters::{ALONE_DIR, AdapterInputs, train_task_adapters};
use crate::base::{check_special_tokens, stage_base};
use crate::corpus::{copy_windows, corpus_windows, encode};
use crate::data::Sequence;
use crate::eval::{exact_match, greedy};
use crate::lora::LoraSet;
use crate::model::{InitConfig, Llama};
use crate::probe::CopyProbe;
use crate::save::{AdapterMeta, write_adapter, write_base};
use crate::train::{TrainConfig, TrainReport, pretrain_probed};
use medley_shard::model::{LlamaDims, ModelConfig};

mod config;

pub use config::{AnchorMix, DemoConfig, ModelDims};

/// One adapter's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    /// Task id.
    pub task: String,
    /// Training on its task alone (`None`: skipped).
    pub single: Option<TrainReport>,
    /// Co-training inside the merge (`None`: skipped).
    pub merge_tune: Option<TrainReport>,
}

/// Exact-match scores on one task's held-out examples.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScores {
    /// Task id.
    pub task: String,
    /// The base model alone.
    pub base: f64,
    /// Each trained adapter alone, by task id.
    pub adapters: Vec<(String, f64)>,
    /// The `cat` merge (weight 1 each) of the trained adapters.
    pub merged: f64,
}

/// What a demo run did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// The settings.
    pub config: DemoConfig,
    /// Base model parameters.
    pub params: usize,
    /// Vocabulary size of the trained tokenizer.
    pub vocab_size: usize,
    /// `(phase, seconds)`.
    pub phases: Vec<(String, f64)>,
    /// The list-copy stage before pretraining (`None` when skipped).
    #[serde(default)]
    pub copy_stage: Option<TrainReport>,
    /// Pretraining (`None` when adapters were trained on an existing base).
    pub pretrain: Option<TrainReport>,
    /// The base's [`CopyProbe`] accuracy after pretraining (`None` without pretraining).
    #[serde(default)]
    pub copy_accuracy: Option<f64>,
    /// The adapters.
    pub adapters: Vec<AdapterSummary>,
    /// The closing check (empty when skipped).
    pub scores: Vec<TaskScores>,
}

pub(crate) fn task_sequences(
    tok: &Tokenizer,
    task: Task,
    seed: u64,
    n: usize,
    all_targets: bool,
) -> Result<Vec<Sequence>, TrainError> {
    generate(task, Split::Train, seed, n)
        .iter()
        .map(|e| {
            let (ids, prompt_len) = encode_example(tok, &e.prompt, &e.completion)
                .map_err(|e| TrainError::Demo(e.to_string()))?;
            Ok(if all_targets {
                Sequence::all(ids)
            } else {
                let (p, c) = ids.split_at(prompt_len);
                Sequence::prompt_completion(p, c)
            })
        })
        .collect()
}

/// Trains and writes the adapters of `tasks` (into `out/adapters/<task>/`) on `base`, then runs
/// the exact-match check when `cfg.eval_examples > 0`; `phases` gets one entry per step.
fn adapters_phase(
    inp: &AdapterInputs<'_>,
    out: &Path,
    cfg: &DemoConfig,
    phases: &mut Vec<(String, f64)>,
) -> Result<(Vec<AdapterSummary>, Vec<TaskScores>), TrainError> {
    let clock = Instant::now();
    let trained = train_task_adapters(inp, cfg)?;
    lap(phases, "adapters", clock);
    let mut adapters = Vec::new();
    let mut sets = Vec::new();
    for t in trained {
        let meta = AdapterMeta {
            base_model_name_or_path: Some(cfg.base_model_name.clone()),
        };
        write_adapter(&out.join("adapters").join(t.task.id()), &t.lora, &meta)?;
        adapters.push(AdapterSummary {
            task: t.task.id().into(),
            single: t.single,
            merge_tune: t.merge_tune,
        });
        sets.push((t.task, t.lora));
    }
    let scores = if cfg.eval_examples > 0 {
        let clock = Instant::now();
        let s = score_all(inp.base, &sets, inp.tok, cfg.eval_examples)?;
        lap(phases, "eval", clock);
        s
    } else {
        Vec::new()
    };
    Ok((adapters, scores))
}

fn lap(phases: &mut Vec<(String, f64)>, name: &str, since: Instant) {
    let s = since.elapsed().as_secs_f64();
    tracing::info!(phase = name, seconds = format!("{s:.1}"), "phase done");
    phases.push((name.to_string(), s));
}

fn write_summary(out: &Path, summary: &DemoSummary) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let path = out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(summary)?)
        .map_err(|e| TrainError::io(&path, e))
}

/// Held-out documents of the copy probe logged during pretraining.
const COPY_PROBE_DOCS: usize = 128;

/// Runs the whole pipeline and writes `out/base/` (model, tokenizer files),
/// `out/adapters/{sql,ad,instruct}/` and `out/summary.json`.
pub fn run_demo(out: &Path, cfg: &DemoConfig) -> Result<DemoSummary, TrainError> {
    let mut phases = Vec::new();
    let clock = Instant::now();
    let tok = medley_demo::tokenizer::tokenizer(&TokenizerOptions {
        seed: cfg.seed,
        corpus_docs: cfg.tokenizer_docs,
        examples_per_task: cfg.tokenizer_examples,
        vocab_size: cfg.vocab_size,
    })
    .map_err(|e| TrainError::Demo(e.to_string()))?;
    let vocab_size = tok.get_vocab_size(true);
    let corpus = corpus_windows(&tok, cfg)?;
    tracing::info!(vocab_size, windows = corpus.len(), "tokenized the corpus");
    lap(&mut phases, "tokenizer+corpus", clock);

    let clock = Instant::now();
    let d = &cfg.dims;
    let mut shape = ModelConfig::llama(LlamaDims {
        vocab_size,
        hidden_size: d.hidden,
        intermediate_size: d.intermediate,
        num_hidden_layers: d.layers,
        num_attention_heads: d.heads,
        num_key_value_heads: d.kv_heads,
    });
    shape.tie_word_embeddings = d.tie_embeddings;
    shape.max_position_embeddings = medley_demo::tokenizer::tokenizer_config().model_max_length;
    shape.eos_token_ids = vec![EOS_ID];
    let init = InitConfig {
        seed: cfg.seed,
        std: cfg.init_std,
    };
    let model = Llama::init(&shape, init, DType::F32, &Device::Cpu)?;
    let probe = CopyProbe::new(&tok, cfg.seed, COPY_PROBE_DOCS)?;
    let mut copy_accuracy = 0.0;
    let mut log_probe = |stage: &str, step: usize| {
        copy_accuracy = probe.accuracy(&model, None)?;
        tracing::info!(
            stage,
            step,
            copy_accuracy = format!("{copy_accuracy:.3}"),
            "copy probe"
        );
        Ok(())
    };
    let copy_stage = if cfg.copy_stage_steps > 0 {
        let windows = copy_windows(&tok, cfg)?;
        let stage = TrainConfig {
            steps: cfg.copy_stage_steps,
            ..cfg.pretrain.clone()
        };
        Some(pretrain_probed(&model, &windows, &stage, |step| {
            log_probe("copy", step)
        })?)
    } else {
        None
    };
    let pre = pretrain_probed(&model, &corpus, &cfg.pretrain, |step| {
        log_probe("corpus", step)
    })?;
    let base_dir = out.join("base");
    write_base(&base_dir, &model, cfg.save_dtype)?;
    write_tokenizer(&tok, &base_dir).map_err(|e| TrainError::Demo(e.to_string()))?;
    lap(&mut phases, "pretrain", clock);

    let (adapters, scores) = adapters_phase(
        &AdapterInputs {
            base: &model,
            tok: &tok,
            corpus: &corpus,
            tasks: &Task::ALL,
            init: None,
            alone_out: Some(&out.join(ALONE_DIR)),
        },
        out,
        cfg,
        &mut phases,
    )?;
    let summary = DemoSummary {
        config: cfg.clone(),
        params: shape.param_count(),
        vocab_size,
        phases,
        copy_stage,
        pretrain: Some(pre),
        copy_accuracy: Some(copy_accuracy),
        adapters,
        scores,
    };
    write_summary(out, &summary)?;
    Ok(summary)
}

/// Trains adapters for `tasks` on an existing base: a demo base (`base_dir` with the model and
/// `tokenizer.json`, e.g. `OUT/base` of [`run_demo`]; `cfg.seed` must be the base's seed for
/// the anchor corpus to be the one it was trained on), another model directory or a GGUF file
/// whose tokenizer has the demo's ChatML ids (SmolLM2's; see [`crate::base`]). With `init`,
/// the adapters start from `init/<task>/` (e.g. to merge-tune trained singles with
/// `task_steps` 0). Writes `out/adapters/<task>/` and `out/summary.json`.
pub fn run_adapters(
    base_dir: &Path,
    out: &Path,
    tasks: &[Task],
    init: Option<&Path>,
    cfg: &DemoConfig,
) -> Result<DemoSummary, TrainError> {
    let mut phases = Vec::new();
    let clock = Instant::now();
    let base_dir = &stage_base(base_dir, out)?;
    let model = Llama::load(base_dir, DType::F32, &Device::Cpu)?;
    let tok_path = base_dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path)
        .map_err(|e| TrainError::Demo(format!("{}: {e}", tok_path.display())))?;
    check_special_tokens(&tok)?;
    let corpus = match &cfg.anchors {
        Some(_) => corpus_windows(&tok, cfg)?,
        None => Vec::new(),
    };
    lap(&mut phases, "load", clock);
    let inputs = AdapterInputs {
        base: &model,
        tok: &tok,
        corpus: &corpus,
        tasks,
        init,
        alone_out: Some(&out.join(ALONE_DIR)),
    };
    let (adapters, scores) = adapters_phase(&inputs, out, cfg, &mut phases)?;
    let summary = DemoSummary {
        config: cfg.clone(),
        params: model.shape().param_count(),
        vocab_size: tok.get_vocab_size(true),
        phases,
        copy_stage: None,
        pretrain: None,
        copy_accuracy: None,
        adapters,
        scores,
    };
    write_summary(out, &summary)?;
    Ok(summary)
}

/// Greedy exact match of the base, each adapter and their `cat` merge on held-out examples.
fn score_all(
    model: &Llama,
    sets: &[(Task, LoraSet)],
    tok: &Tokenizer,
    n: usize,
) -> Result<Vec<TaskScores>, TrainError> {
    let parts: Vec<(&LoraSet, f64)> = sets.iter().map(|(_, s)| (s, 1.0)).collect();
    let merged = LoraSet::concat(&parts)?;
    let mut out = Vec::new();
    for task in Task::ALL {
        let examples = generate(task, Split::Heldout, 0, n);
        let prompts = examples
            .iter()
            .map(|e| encode(tok, &e.prompt))
            .collect::<Result<Vec<_>, _>>()?;
        let expected: Vec<String> = examples.iter().map(|e| e.completion.clone()).collect();
        let max_new = examples
            .iter()
            .map(|e| encode(tok, &e.completion).map(|c| c.len() + 8))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(16);
        let score = |lora: Option<&LoraSet>| -> Result<f64, TrainError> {
            let ids = greedy(model, lora, &prompts, max_new, EOS_ID, 25)?;
            let texts = ids
                .iter()
                .map(|ids| {
                    tok.decode(ids, true)
                        .map_err(|e| TrainError::Demo(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (got, want) in texts.iter().zip(&expected).take(3) {
                tracing::debug!(task = task.id(), got, want, "sample");
            }
            Ok(exact_match(&texts, &expected))
        };
        let mut adapters = Vec::new();
        for (t, set) in sets {
            adapters.push((t.id().to_string(), score(Some(set))?));
        }
        let s = TaskScores {
            task: task.id().into(),
            base: score(None)?,
            adapters,
            merged: score(Some(&merged))?,
        };
        tracing::info!(task = task.id(), base = s.base, adapters = ?s.adapters, merged = s.merged, "exact match");
        out.push(s);
    }
    Ok(out)
}
