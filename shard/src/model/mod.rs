//! The Llama-family forward pass (candle; CPU today, device-generic code).
//!
//! * [`config`] — `config.json` parsing and validation ([`ModelConfig`], [`RopeScaling`]).
//! * `hf_config` — a config built in code ([`LlamaDims`]), its weights' names and shapes, and
//!   the `config.json` it writes.
//! * [`weights`] — memory-mapped single-file or sharded safetensors checkpoints, and GGUF files
//!   (`weights_gguf`).
//! * [`quant`] — quantized base weights (`--quantize`).
//! * [`layers`] — linear, RMSNorm and activation numerics matching transformers.
//! * [`attention`] — rotary embeddings and causal GQA over the paged KV cache.
//! * `paged_attention` — the CPU f32 kernel: tiled online-softmax attention read through
//!   block tables (prefill chunks) and an in-place pass for decode rows; other devices and
//!   dtypes gather the keys and values and use candle ops.
//! * `cpu_storage` — in-place access to CPU tensors' f32 data for that kernel.
//! * [`batch`] — the ragged batch of one step ([`ForwardBatch`], [`SeqChunk`]).
//! * [`lora`] — the LoRA hook ([`LoraDelta`], [`RowSlots`], [`TargetModule`], [`NoLora`]).
//! * [`tp`] — how the layers are split over tensor-parallel ranks ([`TpLayout`]).
//! * [`llama`] — [`LlamaModel`]: loading and the batched forward step.
//! * `greedy` — each logits row's argmax and log-probability on the GPU ([`device_greedy`]).
//!
//! All linear layers run once over the rows of every chunk of a step (continuous batching);
//! attention runs per sequence. Half-precision models compute in their dtype with RMSNorm, SiLU
//! and softmax evaluated in f32, as transformers does.

pub mod attention;
#[cfg(feature = "cuda")]
mod attention_cuda;
pub mod batch;
pub mod config;
mod cpu_storage;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_launch;
mod embedding;
pub mod error_text;
mod fused_cpu;
#[cfg(feature = "cuda")]
mod fused_cuda;
#[cfg(feature = "cuda")]
pub(crate) mod gather_cuda;
#[cfg(feature = "cuda")]
pub mod graphs;
mod greedy;
mod hf_config;
#[cfg(all(feature = "cuda", any(test, feature = "testing")))]
mod kernel_check;
mod kernel_math;
pub mod layers;
pub mod llama;
pub mod lora;
pub(crate) mod paged_attention;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod paged_index;
pub mod quant;
mod quant_matmul;
#[cfg(feature = "cuda")]
mod rope_cuda;
pub(crate) mod row_span;
pub mod tp;
mod vocab;
pub mod weights;
pub(crate) mod weights_gguf;

use std::path::PathBuf;

pub use batch::{ForwardBatch, SeqChunk};
pub use config::{ModelConfig, RopeScaling};
pub use greedy::device_greedy;
pub use hf_config::LlamaDims;
#[cfg(any(test, feature = "testing"))]
pub(crate) use hf_config::torch_dtype_name;
#[doc(hidden)]
#[cfg(all(feature = "cuda", any(test, feature = "testing")))]
pub use kernel_check::{
    KernelCheck, check_fused_ops, check_greedy, check_paged_attention, check_rope_kv_write,
};
pub use llama::LlamaModel;
pub use lora::{LoraDelta, NoLora, RowSlots, SlotRun, TargetModule};
pub use paged_attention::bench_paged_attention;
pub use tp::{LocalShape, TpLayout};

use crate::kv_cache::KvCacheError;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; `None` uses the checkpoint's `torch_dtype`.
    pub dtype: Option<candle_core::DType>,
    /// Device for weights, activations and the KV cache.
    pub device: candle_core::Device,
    /// This rank's part of the model (whole by default).
    pub tp: TpLayout,
    /// The collectives of this rank's group (the identity for a group of one).
    pub comm: std::sync::Arc<dyn crate::comm::Comm>,
    /// How projection weights are held (quantized or dense).
    pub quantize: quant::Quantize,
    /// Multiply each attention block's q, k and v projections, and each MLP's gate and up, as
    /// one matmul over their stacked weights (dense weights only; see [`layers::Projections`]):
    /// three GEMM launches fewer per layer on a GPU. Off by default: transformers runs them
    /// apart, and another GEMM shape may sum in another order.
    pub stack_projections: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: candle_core::Device::Cpu,
            tp: TpLayout::SINGLE,
            comm: std::sync::Arc::new(crate::comm::Single),
            quantize: quant::Quantize::Auto,
            stack_projections: false,
        }
    }
}

/// Errors of model loading and of forward steps.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The checkpoint uses a feature this implementation does not support.
    #[error("unsupported model feature: {0}")]
    Unsupported(String),
    /// A weight the architecture needs is absent.
    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor {
        /// Tensor name.
        name: String,
    },
    /// A weight has the wrong shape.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        actual: Vec<usize>,
    },
    /// The weight files are missing or unreadable.
    #[error("invalid checkpoint: {0}")]
    Weights(String),
    /// The forward batch is inconsistent with the model or the KV cache.
    #[error("invalid forward batch: {0}")]
    InvalidBatch(String),
    /// KV cache failure (unknown sequence, reservation exceeded, ...).
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
    /// The device ran out of memory (the error's text, without backtraces). Converted from a
    /// candle error that says so ([`error_text::is_out_of_memory`]).
    #[error(
        "out of GPU memory ({0}): the weights, the KV cache (--kv-cache-tokens), the adapters \
         (--adapter-memory-budget) and the largest step (--max-batch-prefill-tokens) must fit \
         the device together; lower one, or use more shards (--num-shard) or --quantize"
    )]
    OutOfMemory(String),
    /// Tensor operation failure.
    #[error("tensor error: {}", error_text::Plain(.0))]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        if error_text::is_out_of_memory(&e) {
            Self::OutOfMemory(error_text::Plain(&e).to_string())
        } else {
            Self::Candle(e)
        }
    }
}
