//! LoRA adapters on the shard: resolving and loading PEFT adapters, computing per-request merges,
//! holding the results in slots under a byte budget, and applying many adapters in one batched
//! forward pass.
//!
//! * [`source`] — `LOCAL` ids under the `--adapter-root`s (no `..`, no symlink escapes) and `HUB`
//!   ids from the Hugging Face cache or downloaded into it; `S3` ids (`s3://bucket/prefix`) from
//!   the S3 adapter cache or downloaded into it ([`s3`]).
//! * [`loader`] — [`AdapterLoader`]: resolve, read (through a byte-bounded LRU of parsed adapters),
//!   shape-check against the base model ([`base`]), merge with `medley_merge` on a dedicated pool,
//!   copy to the device — all off the engine thread.
//! * [`weights`] — a slot's factors: `A [r, in]` and `scale · Bᵀ [r, out]` per `(layer, module)`,
//!   with a content hash.
//! * [`store`] — [`AdapterStore`]: the slot table and budget, owned by the engine; it implements
//!   [`crate::model::LoraDelta`] with `medley_kernels` SGMV/BGMV or candle ops.
//! * [`lora_op`] — the batched LoRA kernels as one in-place op over tensors, on the CPU or (with
//!   the `cuda` feature) a GPU.
//! * [`config`] — [`AdapterSettings`] from the command line.

mod cache;
mod delta;
mod error;
#[cfg(feature = "cuda")]
mod lora_op_cuda;
pub(crate) mod upload_cache;

pub mod base;
pub mod config;
pub mod loader;
pub mod lora_op;
pub mod s3;
pub mod source;
pub mod store;
pub mod weights;

pub use base::BaseModules;
pub use config::{AdapterSettings, BuiltinAdapter, parse_byte_size};
pub use error::AdapterError;
pub use loader::{AdapterLoader, LoadPlan, PreparedAdapter};
pub use source::{ADAPTER_LAYOUT, AdapterSources, ResolvedSource};
pub use store::{AdapterSlotInfo, AdapterStore, InstallReport, LoraBackend};
pub use weights::{LORA_DTYPE, SlotAdapter, SlotWeights};
