//! The CUDA side of the attention block: the step's keys and values written into the KV pool
//! and the attention of every row of a ragged batch, one launch each per layer, through
//! `medley_kernels::cuda`'s paged kernels (`kernels/cuda/attention.cu`, PTX loaded once per
//! device). The step's [`PagedIndex`] is uploaded once ([`DeviceIndex`]) and read by every layer,
//! so a step's kernel count does not grow with the number of sequences.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, InplaceOp2, Layout, Shape, Tensor,
};
use medley_kernels::cuda::{
    ATTENTION_PTX, MAX_HEAD_DIM, attention_kernel_names, attention_launch, kv_write_launch,
};

use super::ModelError;
use super::cuda_launch::{kernel, launch_config};
use super::paged_index::PagedIndex;
use crate::kv_cache::KvCache;

/// The name the PTX module is cached under in candle's device.
pub(super) const MODULE: &str = "medley_attention";

/// A step's [`PagedIndex`] on the device.
pub(crate) struct DeviceIndex {
    pub(super) words: CudaSlice<u32>,
    pub(super) rows: u32,
    table_stride: u32,
}

impl DeviceIndex {
    /// Uploads `index` to `device` (a CUDA device).
    pub fn upload(index: &PagedIndex, device: &Device) -> candle_core::Result<Self> {
        let Device::Cuda(dev) = device else {
            candle_core::bail!("paged attention index: not a CUDA device");
        };
        Ok(Self {
            words: dev.clone_htod(&index.words)?,
            rows: index.rows as u32,
            table_stride: index.table_stride as u32,
        })
    }
}

impl DeviceIndex {
    /// Writes `index` over this one in place (a CUDA graph's index: the same rows and table
    /// stride, hence the same length).
    pub fn rewrite(&mut self, index: &PagedIndex, device: &Device) -> candle_core::Result<()> {
        let Device::Cuda(dev) = device else {
            candle_core::bail!("paged attention index: not a CUDA device");
        };
        if index.words.len() != self.words.len()
            || index.rows as u32 != self.rows
            || index.table_stride as u32 != self.table_stride
        {
            candle_core::bail!("paged attention index: rewritten with another layout");
        }
        dev.cuda_stream()
            .memcpy_htod(&index.words, &mut self.words)
            .w()
    }
}

/// The heads of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    /// Query heads (of this rank).
    pub heads: usize,
    /// Key/value heads (of this rank).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Sliding window (keys at positions `p - w + 1..=p`), if any.
    pub window: Option<usize>,
    /// Score scale, `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Whether the kernels serve a model of this shape in `dtype`.
pub(crate) fn supported(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16) && head_dim <= MAX_HEAD_DIM
}

/// Writes a step's keys and values (`[rows, kv_heads, d]`) into `layer` of `kv`'s pool, then
/// attends with queries `q: [rows, heads, d]`; returns `[rows, heads * d]`.
pub(crate) fn write_and_attend(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv: &KvCache,
    index: &DeviceIndex,
    shape: AttentionShape,
) -> Result<Tensor, ModelError> {
    let (keys, values) = kv.layer(layer)?;
    write(keys, k, index)?;
    write(values, v, index)?;
    Ok(attend(q, keys, values, index, shape)?)
}

/// Rotates a step's queries and keys by the tables `cos`/`sin` (`rows × d / 2` each), writes
/// the keys and values into `layer` of `kv`'s pool and attends: two launches (see
/// [`super::rope_cuda`]). `q: [rows, heads * d]`, `k`/`v`: `[rows, kv_heads * d]`, each row
/// contiguous, rows at any stride. Returns `[rows, heads * d]`.
pub(crate) fn rope_write_and_attend(
    layer: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    kv: &KvCache,
    index: &DeviceIndex,
    shape: AttentionShape,
) -> Result<Tensor, ModelError> {
    let pools = kv.layer(layer)?;
    let rotated = super::rope_cuda::RopeKvWrite {
        q,
        k,
        v,
        cos,
        sin,
        pools,
        index,
        shape,
    }
    .run()?;
    Ok(attend(&rotated, pools.0, pools.1, index, shape)?)
}

/// Writes `src: [rows, kv_heads, d]` (a step's keys or values) into `pool` (`[slots, kv_heads,
/// d]`) at the rows' slots.
fn write(pool: &Tensor, src: &Tensor, index: &DeviceIndex) -> candle_core::Result<()> {
    pool.inplace_op2(&src.contiguous()?, &KvWrite { index })
}

/// Attention of `q: [rows, heads, d]` over the pools `keys`/`values` (which already hold this
/// step's rows); returns `[rows, heads * d]`.
fn attend(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    index: &DeviceIndex,
    shape: AttentionShape,
) -> candle_core::Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(keys, values, &PagedAttention { index, shape })
}

pub(super) fn dtype_suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("paged attention: no kernel for {other:?}"),
    }
}

/// The contiguous element range of a layout, or an error naming `what`.
fn range(l: &Layout, what: &str) -> candle_core::Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("paged attention: {what} is not contiguous"),
    }
}

struct KvWrite<'a> {
    index: &'a DeviceIndex,
}

impl KvWrite<'_> {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (_, pkv, pd) = pl.shape().dims3()?;
        let (rows, kvh, d) = sl.shape().dims3()?;
        if (pkv, pd) != (kvh, d) || rows != self.index.rows as usize {
            candle_core::bail!(
                "kv write: pool {:?}, rows {:?}, index of {} rows",
                pl.shape(),
                sl.shape(),
                self.index.rows
            );
        }
        if rows == 0 {
            return Ok(());
        }
        let (pr, sr) = (range(pl, "the pool")?, range(sl, "the rows")?);
        let dev = pool.device.clone();
        let name = attention_kernel_names(dtype_suffix(pool.dtype())?)[0];
        let func = kernel(&dev, MODULE, ATTENTION_PTX, name)?;
        let src = src.as_cuda_slice::<T>()?.slice(sr);
        let mut dst = pool.as_cuda_slice_mut::<T>()?.slice_mut(pr);
        let width = (kvh * d) as u32;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&src)
            .arg(&mut dst)
            .arg(&self.index.words)
            .arg(&width);
        let cfg = launch_config(kv_write_launch(rows as u32));
        // SAFETY: the arguments match medley_kv_write_* in kernels/cuda/attention.cu; src has
        // rows × width elements, and every slot of the index (PagedIndex::new: a block the
        // sequence holds) is below the pool's slots.
        unsafe { launch.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp2 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        "medley-kv-write"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("medley-kv-write runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        match pool.dtype() {
            DType::F32 => self.run::<f32>(pool, pl, src, sl),
            DType::BF16 => self.run::<half::bf16>(pool, pl, src, sl),
            DType::F16 => self.run::<half::f16>(pool, pl, src, sl),
            other => candle_core::bail!("kv write: no kernel for {other:?}"),
        }
    }
}

struct PagedAttention<'a> {
    index: &'a DeviceIndex,
    shape: AttentionShape,
}

impl PagedAttention<'_> {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self.shape;
        let (rows, heads, d) = ql.shape().dims3()?;
        let (_, kvh, kd) = kl.shape().dims3()?;
        if kl.shape() != vl.shape()
            || (heads, kvh, d, kd) != (s.heads, s.kv_heads, s.head_dim, s.head_dim)
            || rows != self.index.rows as usize
            || kvh == 0
            || heads % kvh != 0
            || d > MAX_HEAD_DIM
            || s.block_tokens == 0
        {
            candle_core::bail!(
                "paged attention: q {:?}, pool {:?}, shape {s:?}, index of {} rows",
                ql.shape(),
                kl.shape(),
                self.index.rows
            );
        }
        let dev = qs.device.clone();
        let out_shape = Shape::from((rows, heads * d));
        // SAFETY: the kernel writes every one of the rows × heads × d elements (none when the
        // step has no rows).
        let mut out = unsafe { dev.alloc::<T>(rows * heads * d) }?;
        if rows == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape));
        }
        let q = qs.as_cuda_slice::<T>()?.slice(range(ql, "q")?);
        let k = ks.as_cuda_slice::<T>()?.slice(range(kl, "the key pool")?);
        let v = vs.as_cuda_slice::<T>()?.slice(range(vl, "the value pool")?);
        let name = attention_kernel_names(dtype_suffix(qs.dtype())?)[1];
        let func = kernel(&dev, MODULE, ATTENTION_PTX, name)?;
        let (rows_u, heads_u, kvh_u, d_u) = (rows as u32, heads as u32, kvh as u32, d as u32);
        let bt = s.block_tokens as u32;
        let window = s.window.unwrap_or(0) as u32;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&mut out)
            .arg(&self.index.words);
        launch
            .arg(&rows_u)
            .arg(&heads_u)
            .arg(&kvh_u)
            .arg(&d_u)
            .arg(&bt);
        launch
            .arg(&self.index.table_stride)
            .arg(&window)
            .arg(&s.scale);
        let cfg = launch_config(attention_launch(rows_u, heads_u));
        // SAFETY: the arguments match medley_paged_attention_* in kernels/cuda/attention.cu;
        // q has rows × heads × d elements, out as many; every chunk's block table covers its
        // rows' positions with blocks of the pool (PagedIndex::new).
        unsafe { launch.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "medley-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("medley-paged-attention runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match qs.dtype() {
            DType::F32 => self.run::<f32>(qs, ql, ks, kl, vs, vl),
            DType::BF16 => self.run::<half::bf16>(qs, ql, ks, kl, vs, vl),
            DType::F16 => self.run::<half::f16>(qs, ql, ks, kl, vs, vl),
            other => candle_core::bail!("paged attention: no kernel for {other:?}"),
        }
    }
}
