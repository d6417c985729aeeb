//! Greedy decoding on the GPU: each logits row's argmax and log-probability computed where the
//! logits are (`kernels/cuda/sampling.cu`), so that a decode step of greedy sequences reads back
//! two words per row instead of the vocabulary's worth of f32 per row (4 MB a step at 32 streams
//! of a 32k vocabulary), and the host does not scan them. The kernel reads scores as the host
//! sampler does (NaN never chosen, +inf as the largest finite value, ties to the lowest id).
//! `MEDLEY_CUDA_GREEDY=off` keeps the host path (for comparisons).

use candle_core::Tensor;

/// Each row's greedy choice of `logits: [rows, vocab]` (f32) as `(id, log-probability)`, when
/// the kernel serves them (a CUDA tensor, not turned off); `None` otherwise, and the caller
/// reads the logits back.
pub fn device_greedy(logits: &Tensor) -> candle_core::Result<Option<Vec<(u32, f32)>>> {
    #[cfg(feature = "cuda")]
    {
        let off = super::cuda_launch::env_is!("MEDLEY_CUDA_GREEDY", "off");
        if !off && logits.device().is_cuda() {
            return cuda::greedy(logits).map(Some);
        }
    }
    let _ = logits;
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda_launch::{kernel, launch_config};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{DType, Storage, Tensor};
    use medley_kernels::cuda::{GREEDY_KERNEL, SAMPLING_PTX, greedy_launch};

    /// The name the PTX module is cached under in candle's device.
    const MODULE: &str = "medley_sampling";

    pub(super) fn greedy(logits: &Tensor) -> candle_core::Result<Vec<(u32, f32)>> {
        let (rows, vocab) = logits.dims2()?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if vocab == 0 {
            candle_core::bail!("greedy: logits with an empty vocabulary");
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("greedy: the logits are not on a CUDA device");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("greedy: the logits are not contiguous");
        };
        let dev = cs.device.clone();
        let src = cs.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the launch writes all 2 × rows words (one block per row writes both of its).
        let mut out = unsafe { dev.alloc::<u32>(2 * rows) }?;
        let func = kernel(&dev, MODULE, SAMPLING_PTX, GREEDY_KERNEL)?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let (n, v) = (rows as u32, vocab as u32);
        launch.arg(&src).arg(&mut out).arg(&n).arg(&v);
        let cfg = launch_config(greedy_launch(n));
        // SAFETY: matches medley_greedy_f32 in kernels/cuda/sampling.cu; src holds rows × vocab
        // values, out 2 × rows words.
        unsafe { launch.launch(cfg) }.w()?;
        drop(launch);
        let words = dev.clone_dtoh(&out)?;
        let (ids, logprobs) = words.split_at(rows);
        Ok(ids
            .iter()
            .zip(logprobs)
            .map(|(id, lp)| (*id, f32::from_bits(*lp)))
            .collect())
    }
}
