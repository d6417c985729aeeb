//! In-place access to the f32 data of CPU tensors, for kernels that read the KV pool through
//! block tables instead of through candle ops.

use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Whether the CPU kernels can serve queries `q` (f32 on the CPU).
pub(crate) fn supported(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32
}

/// The whole f32 buffer behind a contiguous CPU tensor, from its start offset.
fn data<'a>(storage: &'a Storage, t: &Tensor, what: &str) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(v)) = storage else {
        candle_core::bail!("{what}: f32 on the CPU expected");
    };
    match t.layout().contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: not contiguous"),
    }
}

/// Runs `f` over the contiguous f32 data of `q`, `k` and `v` (CPU tensors), holding their
/// storage locks for the call.
pub(crate) fn with_cpu_f32<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (qs, _) = q.storage_and_layout();
    let (ks, _) = k.storage_and_layout();
    let (vs, _) = v.storage_and_layout();
    f(
        data(&qs, q, "queries")?,
        data(&ks, k, "keys")?,
        data(&vs, v, "values")?,
    )
}
