//! The rotary embedding of a step's queries and keys and its KV write in one launch per layer
//! (`medley_rope_kv_write_*` in `kernels/cuda/attention.cu`), in place of candle's rotation of
//! the queries, of the keys, and the two KV writes: four launches and two allocations fewer per
//! layer. It rounds where transformers does (`x * cos + rotate_half(x) * sin`, each product and
//! the sum in the activations' dtype), in f32 as well. The queries, keys and values may be column
//! ranges of one fused projection (rows at any stride, each row contiguous).
//! `MEDLEY_CUDA_FUSED=off` keeps candle's rotation and the two writes.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Layout, Storage, Tensor};
use medley_kernels::cuda::{ATTENTION_PTX, attention_kernel_names, kv_write_launch};

use super::attention_cuda::{AttentionShape, DeviceIndex, MODULE, dtype_suffix};
use super::cuda_launch::{kernel, launch_config};
use super::row_span::RowSpan;

/// What one launch reads and writes.
pub(crate) struct RopeKvWrite<'a> {
    /// `[rows, heads * d]`: the step's queries.
    pub q: &'a Tensor,
    /// `[rows, kv_heads * d]`: its keys.
    pub k: &'a Tensor,
    /// `[rows, kv_heads * d]`: its values.
    pub v: &'a Tensor,
    /// cos and sin of the rows' positions, `rows × d / 2` each, contiguous.
    pub cos: &'a Tensor,
    /// See `cos`.
    pub sin: &'a Tensor,
    /// The layer's key and value pools, `[slots, kv_heads, d]` each.
    pub pools: (&'a Tensor, &'a Tensor),
    /// The step's index (the rows' slots first).
    pub index: &'a DeviceIndex,
    /// Heads and head dimension.
    pub shape: AttentionShape,
}

impl RopeKvWrite<'_> {
    /// Writes the rotated keys and the values into the pools; returns the rotated queries,
    /// `[rows, heads, d]`.
    pub fn run(&self) -> candle_core::Result<Tensor> {
        match self.q.dtype() {
            DType::F32 => self.run_as::<f32>(),
            DType::BF16 => self.run_as::<half::bf16>(),
            DType::F16 => self.run_as::<half::f16>(),
            other => candle_core::bail!("rope + kv write: no kernel for {other:?}"),
        }
    }

    fn run_as<T: CudaDType + DeviceRepr>(&self) -> candle_core::Result<Tensor> {
        let Device::Cuda(dev) = self.q.device() else {
            candle_core::bail!("rope + kv write: not on a CUDA device");
        };
        let s = self.shape;
        let (h, g, d) = (s.heads, s.kv_heads, s.head_dim);
        let rows = self.q.dim(0)?;
        let half = d / 2;
        let tensors = [
            self.q,
            self.k,
            self.v,
            self.cos,
            self.sin,
            self.pools.0,
            self.pools.1,
        ];
        if d % 2 != 0
            || rows != self.index.rows as usize
            || tensors.iter().any(|t| t.dtype() != self.q.dtype())
            || self.pools.0.dims3()? != (self.pools.0.dim(0)?, g, d)
            || self.pools.1.shape() != self.pools.0.shape()
        {
            candle_core::bail!(
                "rope + kv write: q {:?}, pools {:?}, shape {s:?}, index of {} rows",
                self.q.shape(),
                self.pools.0.shape(),
                self.index.rows
            );
        }
        if rows == 0 {
            return Tensor::zeros((0, h, d), self.q.dtype(), self.q.device());
        }
        let stream = dev.cuda_stream();
        // Device addresses, each read under its own storage lock (q, k and v may share one).
        let (q, q_stride) = rows_at::<T>(self.q, h * d, &stream, "q")?;
        let (k, k_stride) = rows_at::<T>(self.k, g * d, &stream, "k")?;
        let (v, v_stride) = rows_at::<T>(self.v, g * d, &stream, "v")?;
        let cos = whole_at::<T>(self.cos, rows * half, &stream, "cos")?;
        let sin = whole_at::<T>(self.sin, rows * half, &stream, "sin")?;
        let kpool = whole_at::<T>(self.pools.0, self.pools.0.elem_count(), &stream, "keys")?;
        let vpool = whole_at::<T>(self.pools.1, self.pools.1.elem_count(), &stream, "values")?;
        // SAFETY: the launch writes every one of the rows × heads × d elements.
        let mut out = unsafe { dev.alloc::<T>(rows * h * d) }?;
        let name = attention_kernel_names(dtype_suffix(self.q.dtype())?)[2];
        let func = kernel(dev, MODULE, ATTENTION_PTX, name)?;
        let strides = [q_stride, k_stride, v_stride].map(|x| x as u32);
        let (hu, gu, du) = (h as u32, g as u32, d as u32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&cos)
            .arg(&sin)
            .arg(&mut out);
        launch.arg(&kpool).arg(&vpool).arg(&self.index.words);
        launch.arg(&strides[0]).arg(&strides[1]).arg(&strides[2]);
        launch.arg(&hu).arg(&gu).arg(&du);
        let cfg = launch_config(kv_write_launch(rows as u32));
        // SAFETY: the arguments match medley_rope_kv_write_* in kernels/cuda/attention.cu;
        // rows_at / whole_at checked that every row and table lies inside its storage, and every
        // slot of the index (PagedIndex::new: a block the sequence holds) is below the pools'
        // slots. The tensors are borrowed for the whole call, so their memory stays allocated
        // until the kernel is queued, and the one stream orders it after their writers.
        unsafe { launch.launch(cfg) }.w()?;
        drop(launch);
        let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            (rows, h, d),
            BackpropOp::none(),
            false,
        ))
    }
}

/// The device address of `t`'s first row (`[rows, width]`, each row contiguous) and its row
/// stride in elements, after checking that every row lies inside its storage.
fn rows_at<T: CudaDType + DeviceRepr>(
    t: &Tensor,
    width: usize,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    what: &str,
) -> candle_core::Result<(u64, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let Some(span) = RowSpan::of(layout).filter(|s| s.width == width) else {
        candle_core::bail!(
            "rope + kv write: {what} {:?} is not rows of {width}",
            t.shape()
        );
    };
    Ok((
        address::<T>(&storage, layout, span.end, stream, what)?,
        span.stride,
    ))
}

/// The device address of contiguous `t`, which must hold `n` elements.
fn whole_at<T: CudaDType + DeviceRepr>(
    t: &Tensor,
    n: usize,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    what: &str,
) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    match layout.contiguous_offsets() {
        Some((a, b)) if b - a == n => address::<T>(&storage, layout, b, stream, what),
        _ => candle_core::bail!(
            "rope + kv write: {what} {:?} is not {n} contiguous elements",
            t.shape()
        ),
    }
}

/// The address of `layout`'s first element in `storage`, whose elements up to `end` must exist.
fn address<T: CudaDType + DeviceRepr>(
    storage: &Storage,
    layout: &Layout,
    end: usize,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    what: &str,
) -> candle_core::Result<u64> {
    let Storage::Cuda(cs) = storage else {
        candle_core::bail!("rope + kv write: {what} is not on the GPU");
    };
    let slice = cs.as_cuda_slice::<T>()?;
    if end > slice.len() {
        candle_core::bail!("rope + kv write: {what} reaches past its storage");
    }
    let (ptr, _record) = slice.device_ptr(stream);
    Ok(ptr + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}
