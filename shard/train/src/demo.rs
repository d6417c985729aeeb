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
//! * **Modest rank** ([`LoraConfig::rank`], 8; `alpha` 16): small updates with little room for
//!   incidental changes. `instruct`, six kinds of instruction in one adapter, gets rank 16
//!   ([`DemoConfig::task_lora`]): at rank 8 it tops out at 67-75% alone.
//! * **LoRA dropout** ([`LoraConfig::dropout`], 0.05) and **weight decay** on `A` and `B`
//!   ([`OptimConfig::weight_decay`] of `lora_train`, 0.05): smaller, less idiosyncratic factors.
//! * **Anchoring** ([`AnchorMix`]): each step adds `weight · KL(base ‖ base + adapter)` on a batch
//!   of other text — base-corpus windows and the *other* tasks' examples (prompt and
//!   completion) — whose targets are the frozen base's own predictions. The adapter thus learns
//!   to leave those inputs alone, which is what a merge needs: on an `ad` prompt the `sql`
//!   adapter's share of the merged update should be ~0.
//! * **Train alone, then tune inside the merge** ([`crate::adapters`]): each adapter first
//!   trains on its own task (the three concurrently, uniform batches, `instruct` twice as long);
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
use crate::adapters::{
    AdapterInputs, MergeTune, PerTask, TaskLora, TaskSteps, train_task_adapters,
};
use crate::base::{check_special_tokens, stage_base};
use crate::corpus::{copy_windows, corpus_windows, encode};
use crate::data::Sequence;
use crate::eval::{exact_match, greedy};
use crate::lora::{LoraConfig, LoraSet};
use crate::model::{InitConfig, Llama};
use crate::optim::OptimConfig;
use crate::probe::CopyProbe;
use crate::save::{AdapterMeta, SaveDtype, write_adapter, write_base};
use crate::shape::LlamaShape;
use crate::train::{AnchorConfig, CoTrainConfig, TrainConfig, TrainReport, pretrain_probed};

/// The base model's size (the vocabulary comes from the tokenizer).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDims {
    /// Width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Tie `lm_head` to the embedding.
    pub tie_embeddings: bool,
}

/// What each adapter's anchor batches are drawn from (see [`AnchorConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnchorMix {
    /// Batch size and weight of the KL term.
    pub anchor: AnchorConfig,
    /// Base-corpus windows in the anchor pool.
    pub corpus_windows: usize,
    /// Examples of each other task (prompt and completion, every position) in the pool.
    pub other_task_examples: usize,
    /// Anchor the adapters' training alone too, not only their merge-tuning.
    pub in_singles: bool,
}

impl AnchorMix {
    /// 8 anchor sequences per step with KL weight `weight`, drawn from 2000 corpus windows and
    /// 1000 examples of each other task.
    pub fn standard(weight: f64) -> Self {
        Self {
            anchor: AnchorConfig {
                batch_size: 8,
                weight,
            },
            corpus_windows: 2000,
            other_task_examples: 1000,
            in_singles: true,
        }
    }
}

/// Everything `medley-train demo` does, with its sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoConfig {
    /// Seed of the data, the initialisation and the data order.
    pub seed: u64,
    /// Base corpus documents the tokenizer is trained on.
    pub tokenizer_docs: usize,
    /// Examples per task the tokenizer is trained on.
    pub tokenizer_examples: usize,
    /// Vocabulary size (upper bound).
    pub vocab_size: usize,
    /// The base model's size.
    pub dims: ModelDims,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
    /// Base corpus documents for pretraining.
    pub corpus_docs: usize,
    /// Pretraining window (tokens per sequence).
    pub seq_len: usize,
    /// Fraction of corpus documents written twice in a row. The demo corpus rarely repeats a
    /// word within a document, so a base trained on it alone does not learn to copy from its
    /// context (no induction heads); every task needs copying (products into ads, columns and
    /// values into SQL, words into answers), and adapters on such a base learn each task's
    /// template but not the copy. Repeated documents teach copying without any task's
    /// prompt → answer mapping.
    pub repeat_docs: f64,
    /// Fraction of the corpus documents replaced by list copies
    /// ([`medley_demo::recall::list_copy`]): values with no structure to predict them but an
    /// earlier copy, the signal that grows a copy circuit in the base.
    pub copy_docs: f64,
    /// Steps of a first pretraining stage on list copies alone (0: none), with the settings of
    /// [`Self::pretrain`]. A base of this size needs about a thousand such steps before it
    /// copies from its context at all (measured with the same model in PyTorch too), far more
    /// than a mixed corpus gives it, and the demo's adapters need that skill.
    pub copy_stage_steps: usize,
    /// Pretraining.
    pub pretrain: TrainConfig,
    /// Training examples per task.
    pub examples_per_task: usize,
    /// The adapters' LoRA settings.
    pub lora: LoraConfig,
    /// Adapter training.
    pub lora_train: TrainConfig,
    /// Steps of the adapters that train alone for more or fewer than `lora_train.steps` (the
    /// merge-tuning that follows has its own, [`MergeTune::steps`]).
    pub task_steps: TaskSteps,
    /// Adapters whose rank, alpha and learning rate differ from `lora` and `lora_train`.
    pub task_lora: PerTask<TaskLora>,
    /// Anchoring of the adapters to the base outside their task (`None`: task data only).
    pub anchors: Option<AnchorMix>,
    /// Merge-aware co-training of the trained adapters (`None`: each trained alone only).
    pub merge_tune: Option<MergeTune>,
    /// Held-out examples per task for the closing exact-match check (0: skip it).
    pub eval_examples: usize,
    /// Storage dtype of the base weights.
    pub save_dtype: SaveDtype,
    /// `base_model_name_or_path` written into the adapters.
    pub base_model_name: String,
}

impl DemoConfig {
    /// The demo as shipped (`tests/fixtures/demo/`, trained on 2 cores): ~1.2 M parameters
    /// (d 128, 4 layers, GQA 4/2), 1500 steps of list copies then 1500 pretraining steps;
    /// rank-8 adapters on every projection with dropout and weight decay, trained alone for 3000
    /// steps (`instruct` 6000) on 16,000 examples each, then co-trained inside their merge.
    pub fn full(seed: u64) -> Self {
        let lora_optim = OptimConfig {
            lr: 5e-3,
            weight_decay: 0.05,
            ..OptimConfig::default()
        };
        Self {
            seed,
            tokenizer_docs: 20_000,
            tokenizer_examples: 5_000,
            vocab_size: medley_demo::tokenizer::VOCAB_SIZE,
            dims: ModelDims {
                hidden: 128,
                layers: 4,
                intermediate: 352,
                heads: 4,
                kv_heads: 2,
                tie_embeddings: false,
            },
            init_std: 0.02,
            corpus_docs: 40_000,
            seq_len: 64,
            repeat_docs: 0.5,
            copy_docs: 0.25,
            copy_stage_steps: 1500,
            pretrain: TrainConfig {
                steps: 1500,
                batch_size: 16,
                max_len: 65,
                warmup_steps: 50,
                min_lr_ratio: 0.1,
                group_by_length: false,
                log_every: 50,
                seed,
                optim: OptimConfig::default(),
            },
            examples_per_task: 16_000,
            lora: LoraConfig {
                seed,
                ..LoraConfig::default()
            },
            lora_train: TrainConfig {
                steps: 3000,
                batch_size: 16,
                max_len: 96,
                warmup_steps: 20,
                min_lr_ratio: 0.1,
                // Length grouping puts one instruct kind per batch (their lengths differ): 0.16
                // exact after 800 steps against 0.28 with uniform batches, as PEFT gets.
                group_by_length: false,
                log_every: 50,
                seed,
                optim: lora_optim,
            },
            task_steps: TaskSteps {
                instruct: Some(6000),
                ..TaskSteps::default()
            },
            // Six kinds of instruction need more room than one format: at rank 8 the adapter
            // alone scored 67-75% (6000 steps), at rank 16 (lr 3e-3) 86%.
            task_lora: PerTask {
                instruct: Some(TaskLora {
                    rank: 16,
                    alpha: 32.0,
                    lr: 3e-3,
                }),
                ..PerTask::default()
            },
            // Anchoring during the merge-tuning only: each adapter alone is also kept close to
            // the base on the other tasks' examples, so it stops disturbing them inside the
            // merge and the others stop chasing it. Without it the `cat` merge of these
            // adapters kept 70 / 100 / 64% of their scores (and 82 / 100 / 66% at lr 1.8e-3);
            // with it 99 / 100 / 99%.
            anchors: Some(AnchorMix {
                in_singles: false,
                ..AnchorMix::standard(1.0)
            }),
            // 300 steps at 2e-3 kept 54 / 90 / 46% of the (rank 8) singles' scores in the `cat`
            // merge, 1000 at 3e-3 76 / 100 / 85%, both without anchoring.
            merge_tune: Some(MergeTune {
                co_train: CoTrainConfig { merged_weight: 1.0 },
                steps: 1000,
                lr: 3e-3,
                task_lr: PerTask::default(),
            }),
            eval_examples: 50,
            save_dtype: SaveDtype::F32,
            base_model_name: "medley-demo".into(),
        }
    }

    /// A run of a minute or so with the same code paths (a tiny model, few steps), for CI-like
    /// checks of the pipeline; its models learn little.
    pub fn smoke(seed: u64) -> Self {
        let mut c = Self::full(seed);
        c.tokenizer_docs = 2000;
        c.tokenizer_examples = 300;
        c.vocab_size = 512;
        c.dims = ModelDims {
            hidden: 32,
            layers: 2,
            intermediate: 64,
            heads: 4,
            kv_heads: 2,
            tie_embeddings: false,
        };
        c.corpus_docs = 2000;
        c.copy_stage_steps = 5;
        c.pretrain.steps = 30;
        c.pretrain.log_every = 10;
        c.examples_per_task = 200;
        c.lora_train.steps = 10;
        c.lora_train.log_every = 5;
        c.task_steps = TaskSteps::default();
        if let Some(t) = c.merge_tune.as_mut() {
            t.steps = 5;
        }
        if let Some(a) = c.anchors.as_mut() {
            a.corpus_windows = 100;
            a.other_task_examples = 50;
        }
        c.eval_examples = 4;
        c
    }
}

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
    let mut shape = LlamaShape::new(
        vocab_size,
        d.hidden,
        d.intermediate,
        d.layers,
        d.heads,
        d.kv_heads,
    );
    shape.tie_word_embeddings = d.tie_embeddings;
    shape.max_position_embeddings = medley_demo::tokenizer::tokenizer_config().model_max_length;
    shape.eos_token_id = Some(EOS_ID);
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
