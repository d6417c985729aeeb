//! Training in Rust with candle: the demo's small Llama base model and PEFT LoRA adapters.
//!
//! * [`shape`] — what the training forward supports of an architecture (Medley's
//!   [`medley_shard::model::ModelConfig`]).
//! * [`params`] — named trainable tensors with seeded initialisation ([`ParamStore`]).
//! * [`model`] — the differentiable Llama forward ([`Llama`]), equal to transformers'
//!   `LlamaForCausalLM` and to Medley's inference forward.
//! * [`lora`] — PEFT-style LoRA factors ([`LoraSet`], [`LoraConfig`]).
//! * [`corpus`] — the demo's pretraining text as packed windows (corpus, list copies).
//! * [`data`] — sequences with loss masks, right-padded batches, a seeded batch order.
//! * [`loss`] — masked cross-entropy and the KL-to-base anchor term.
//! * [`optim`] — AdamW with warmup + cosine and global-norm clipping.
//! * [`train`] — the pretraining and LoRA loops ([`pretrain`], [`train_lora`]).
//! * [`measure`] — training throughput of a shape / batch / length on this machine.
//! * [`eval`] — greedy decoding and exact match with the training forward.
//! * [`probe`] — how well a model copies from its context ([`probe::CopyProbe`]).
//! * [`demo`] — the demo pipeline on `medley-demo`'s data ([`demo::run_demo`]).
//! * [`save`] — the Hugging Face base directory and PEFT adapter directories Medley loads.

pub mod adapters;
pub mod base;
pub mod corpus;
pub mod data;
pub mod demo;
mod error;
pub mod eval;
pub mod lora;
pub mod loss;
pub mod measure;
pub mod model;
pub mod optim;
mod parallel;
pub mod params;
pub mod probe;
pub mod save;
pub mod shape;
pub mod smollm2;
pub mod train;

pub use data::{Batch, BatchOrder, Sequence};
pub use error::TrainError;
pub use lora::{LoraConfig, LoraSet, Target};
pub use model::{ForwardOptions, InitConfig, Llama};
pub use optim::{OptimConfig, ScheduleConfig};
pub use params::ParamStore;
pub use save::{AdapterMeta, SaveDtype, write_adapter, write_base};
pub use train::{
    AnchorConfig, CoTrainConfig, LoraJob, TrainConfig, TrainReport, pretrain, pretrain_probed,
    train_lora, train_loras,
};
