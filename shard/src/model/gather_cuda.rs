//! Two device operations for a step whose inputs are read on the GPU: the rows of a table at
//! ids already on the device (`kernels/cuda/gather.cu`: the embedding of the step's tokens, the
//! rotary tables at its positions), and the host's words written into a tensor that exists
//! already (a CUDA graph's inputs, which must stay where the graph recorded them).
//!
//! candle's `index_select` uploads its index's shape with every call; a copy from host memory
//! cannot be recorded into a CUDA graph, so the step a graph replays gathers with this kernel.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp1, Layout, Shape, Tensor};
use medley_kernels::cuda::{GATHER_PTX, gather_kernel_name, gather_launch};

use super::cuda_launch::{kernel, launch_config};

/// The name the PTX module is cached under in candle's device.
const MODULE: &str = "medley_gather";

/// Rows `ids[r]` of `table: [n, width]` as `[ids.len(), width]`, on the GPU (`ids`: u32 on the
/// device). An id at or past `n` gives a row of zeros.
pub(crate) fn gather_rows(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    table
        .contiguous()?
        .apply_op2_no_bwd(&ids.contiguous()?, &GatherRows)
}

/// Writes `words` into `dst` (u32, contiguous, on the GPU, as many elements), in place.
pub(crate) fn write_words(dst: &Tensor, words: &[u32]) -> candle_core::Result<()> {
    if dst.elem_count() != words.len() {
        candle_core::bail!(
            "write_words: {} words into a tensor of {}",
            words.len(),
            dst.elem_count()
        );
    }
    dst.inplace_op1(&WriteWords(words))
}

struct GatherRows;

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "medley-gather-rows"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("medley-gather-rows runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        ts: &CudaStorage,
        tl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, width) = tl.shape().dims2()?;
        let rows = il.shape().dims1()?;
        let (Some((t0, t1)), Some((i0, i1))) = (tl.contiguous_offsets(), il.contiguous_offsets())
        else {
            candle_core::bail!("gather_rows: operands are not contiguous");
        };
        if is.dtype() != DType::U32 {
            candle_core::bail!("gather_rows: ids are {:?}, not u32", is.dtype());
        }
        let dev = ts.device.clone();
        let ids = is.as_cuda_slice::<u32>()?.slice(i0..i1);
        let shape = Shape::from((rows, width));
        let bytes = ts.dtype().size_in_bytes();
        let Some(name) = gather_kernel_name(bytes) else {
            candle_core::bail!("gather_rows: no kernel for {:?}", ts.dtype());
        };
        let func = kernel(&dev, MODULE, GATHER_PTX, name)?;
        let (rows32, width32, n32) = (rows as u32, width as u32, n as u32);
        let cfg = launch_config(gather_launch(rows32, width32));
        let stream = dev.cuda_stream();
        // Values of 2 or 4 bytes, copied bit for bit by the kernel of that width.
        macro_rules! run {
            ($t:ty) => {{
                let table = ts.as_cuda_slice::<$t>()?.slice(t0..t1);
                // SAFETY: the launch writes every rows × width value (zeros for ids past n).
                let mut out = unsafe { dev.alloc::<$t>(rows * width) }?;
                if rows * width > 0 {
                    let mut launch = stream.launch_builder(&func);
                    launch.arg(&table).arg(&ids).arg(&mut out);
                    launch.arg(&width32).arg(&n32);
                    // SAFETY: matches medley_gather_rows_b16/b32 in kernels/cuda/gather.cu (the
                    // value type has the kernel's width); table holds n × width values, ids
                    // rows, out rows × width.
                    unsafe { launch.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match ts.dtype() {
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            DType::F32 => run!(f32),
            DType::U32 => run!(u32),
            other => candle_core::bail!("gather_rows: no kernel for {other:?}"),
        };
        Ok((out, shape))
    }
}

struct WriteWords<'a>(&'a [u32]);

impl InplaceOp1 for WriteWords<'_> {
    fn name(&self) -> &'static str {
        "medley-write-words"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("medley-write-words writes CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("write_words: the tensor is not contiguous");
        };
        let dev = storage.device.clone();
        let slice = storage.as_cuda_slice_mut::<u32>()?;
        let mut dst = slice.slice_mut(start..end);
        dev.cuda_stream().memcpy_htod(self.0, &mut dst).w()?;
        Ok(())
    }
}
