//! The demo's settings ([`DemoConfig`]): the shipped preset and the smoke preset (the reasons
//! behind the values are in [`crate::demo`]).

use serde::Serialize;

use crate::adapters::{MergeTune, PerTask, TaskLora, TaskSteps};
use crate::lora::LoraConfig;
use crate::optim::OptimConfig;
use crate::save::SaveDtype;
use crate::train::{AnchorConfig, CoTrainConfig, TrainConfig};

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
    /// steps (`instruct` 12,000) on 16,000 examples each, then co-trained inside their merge.
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
            // `instruct` at rank 16 was still learning at 6000 steps (loss 0.40, 86% alone); at
            // 12,000 its loss is 0.13 and it scores 97% alone.
            task_steps: TaskSteps {
                instruct: Some(12_000),
                ..TaskSteps::default()
            },
            // Six kinds of instruction need more room than one format: at rank 8 the adapter
            // alone scored 67-75% (6000 steps), at rank 16 (lr 3e-3) 86% (6000 steps).
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
