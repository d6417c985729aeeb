//! The CUDA kernels, compiled to PTX by nvcc when this crate is built with the `cuda` feature
//! (see `build.rs`), for f32, bf16 and f16 activations, and loaded by name into a CUDA context:
//! the LoRA kernels of `kernels/cuda/lora.cu` ([`LORA_PTX`], f32 factors) and the paged
//! attention and KV-cache write of `kernels/cuda/attention.cu` ([`ATTENTION_PTX`]), and the
//! half-precision RMSNorm (alone or after the residual add) and SiLU·mul of
//! `kernels/cuda/fused.cu` ([`FUSED_PTX`]); the greedy argmax of `kernels/cuda/sampling.cu`
//! ([`SAMPLING_PTX`]); the row gathers of `kernels/cuda/gather.cu` ([`GATHER_PTX`]); and for
//! benchmarks, the stream-holding kernel of `kernels/cuda/timing.cu` ([`TIMING_PTX`]).
//!
//! Names and launch shapes are in [`crate::launch`], re-exported here.

pub use crate::launch::*;

/// The PTX module of every LoRA kernel.
pub const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));

/// The PTX module of the paged attention and KV-cache write kernels.
pub const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// The PTX module of the fused half-precision RMSNorm, add + RMSNorm and SiLU·mul kernels.
pub const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// The PTX module of the greedy kernel ([`GREEDY_KERNEL`]).
pub const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

/// The PTX module of the row gathers ([`gather_kernel_name`]).
pub const GATHER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gather.ptx"));

/// The PTX module of `medley_spin(ns)`, which holds its stream for `ns` nanoseconds (grid 1,
/// block 1) so that the calls queued behind it are timed on the GPU alone.
pub const TIMING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/timing.ptx"));

/// The name of the stream-holding kernel in [`TIMING_PTX`].
pub const SPIN_KERNEL: &str = "medley_spin";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ptx_holds_every_entry_point() {
        for dtype in DTYPES {
            for name in kernel_names(dtype) {
                assert!(
                    LORA_PTX.contains(&format!(".entry {name}(")),
                    "{name} is not in the PTX"
                );
            }
        }
    }

    #[test]
    fn the_ptx_holds_the_grouped_entry_points() {
        for dtype in DTYPES {
            for name in grouped_kernel_names(dtype) {
                assert!(LORA_PTX.contains(&format!(".entry {name}(")), "{name}");
            }
        }
    }

    #[test]
    fn the_attention_ptx_holds_every_entry_point() {
        for dtype in DTYPES {
            for name in attention_kernel_names(dtype) {
                assert!(
                    ATTENTION_PTX.contains(&format!(".entry {name}(")),
                    "{name} is not in the PTX"
                );
            }
        }
        for dtype in FUSED_DTYPES {
            for name in fused_kernel_names(dtype) {
                assert!(
                    FUSED_PTX.contains(&format!(".entry {name}(")),
                    "{name} is not in the PTX"
                );
            }
        }
        assert!(TIMING_PTX.contains(&format!(".entry {SPIN_KERNEL}(")));
        assert!(SAMPLING_PTX.contains(&format!(".entry {GREEDY_KERNEL}(")));
        for bytes in [2, 4] {
            let name = gather_kernel_name(bytes).expect("2 and 4 bytes have a kernel");
            assert!(GATHER_PTX.contains(&format!(".entry {name}(")), "{name}");
        }
    }
}
