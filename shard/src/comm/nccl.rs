//! The NCCL backend of [`Comm`] (the `cuda` feature): ranks on GPUs of their own, collectives on
//! the device through cudarc's NCCL bindings, queued on candle's stream of the rank's device so
//! they are ordered with the forward pass.
//!
//! The launcher creates the group's unique id once per group start ([`new_unique_id`]; its
//! bootstrap listener lives in the launcher process) and hands it to every rank as
//! `MEDLEY_NCCL_ID` ([`super::backend::nccl_id_to_hex`]); every rank then joins with
//! [`NcclComm::join`], which blocks until all have.
//!
//! [`Comm::all_reduce_sum_tensor`] stays on the device: the partial sums are widened to f32,
//! all-reduced by NCCL (whose ring and tree algorithms give every rank the same bits) and
//! rounded once. The host-slice collectives copy through the device. A failed NCCL call poisons
//! the communicator ([`Comm::check`] then fails and the launcher restarts the group); a rank
//! that dies mid-collective leaves the others blocked in NCCL until the launcher, which watches
//! every rank's process, stops the whole group.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm as RawComm, Id, ReduceOp, result::NcclError};
use candle_core::{CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::backend::NCCL_ID_BYTES;
use super::{Comm, CommError};
use crate::model::error_text::Plain;

/// A fresh NCCL unique id (starts NCCL's bootstrap listener in this process, which must outlive
/// the group's start-up).
pub fn new_unique_id() -> Result<[u8; NCCL_ID_BYTES], CommError> {
    let id = Id::new().map_err(|e| nccl_error(0, "ncclGetUniqueId", e))?;
    Ok(id.internal().map(|c| c as u8))
}

fn nccl_error(rank: usize, op: &'static str, e: NcclError) -> CommError {
    CommError::Nccl {
        rank,
        op,
        reason: format!("{:?}", e.0),
    }
}

/// One rank of an NCCL group.
pub struct NcclComm {
    raw: Mutex<RawComm>,
    device: CudaDevice,
    rank: usize,
    world: usize,
    failed: AtomicBool,
}

// SAFETY: the NCCL communicator is a handle that NCCL allows to be used from any thread, one
// call at a time; every use goes through the mutex, and the CUDA stream it is bound to is
// candle's (itself shared between threads).
unsafe impl Send for NcclComm {}
// SAFETY: as above: shared access only reaches the handle through the mutex.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish()
    }
}

impl NcclComm {
    /// Joins the group of `world` ranks with unique id `id` as `rank`, on `device`'s stream.
    /// Blocks until every rank has joined.
    pub fn join(
        device: &Device,
        rank: usize,
        world: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<Self, CommError> {
        let Device::Cuda(dev) = device else {
            return Err(CommError::Size(format!(
                "rank {rank}: NCCL needs a CUDA device, not {device:?}"
            )));
        };
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let raw = RawComm::from_rank(dev.cuda_stream(), rank, world, id)
            .map_err(|e| nccl_error(rank, "ncclCommInitRank", e))?;
        Ok(Self {
            raw: Mutex::new(raw),
            device: dev.clone(),
            rank,
            world,
            failed: AtomicBool::new(false),
        })
    }

    /// Runs one NCCL call; a failure poisons the communicator.
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&RawComm) -> Result<T, NcclError>,
    ) -> Result<T, CommError> {
        self.check()?;
        let raw = self
            .raw
            .lock()
            .map_err(|_| CommError::Poisoned { rank: self.rank })?;
        f(&raw).map_err(|e| {
            self.failed.store(true, Ordering::SeqCst);
            nccl_error(self.rank, op, e)
        })
    }

    /// A device error (copies, allocation) in the communicator's terms.
    fn device_error(&self, op: &'static str, e: candle_core::Error) -> CommError {
        self.failed.store(true, Ordering::SeqCst);
        CommError::Nccl {
            rank: self.rank,
            op,
            reason: Plain(&e).to_string(),
        }
    }

    /// Runs `f` on a device copy of `buf` and copies the result back.
    fn through_device(
        &self,
        op: &'static str,
        buf: &mut [f32],
        f: impl FnOnce(
            &RawComm,
            &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        ) -> Result<(), NcclError>,
    ) -> Result<(), CommError> {
        let mut d = self
            .device
            .clone_htod(&*buf)
            .map_err(|e| self.device_error(op, e))?;
        self.call(op, |c| f(c, &mut d))?;
        let host = self
            .device
            .clone_dtoh(&d)
            .map_err(|e| self.device_error(op, e))?;
        buf.copy_from_slice(&host);
        Ok(())
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.through_device("all_reduce", buf, |c, d| {
            c.all_reduce_in_place(d, &ReduceOp::Sum).map(|_| ())
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        if output.len() != input.len() * self.world {
            return Err(CommError::Size(format!(
                "all_gather: output of {} for an input of {} at world size {}",
                output.len(),
                input.len(),
                self.world
            )));
        }
        let op = "all_gather";
        let src = self
            .device
            .clone_htod(input)
            .map_err(|e| self.device_error(op, e))?;
        let mut dst = self
            .device
            .alloc_zeros::<f32>(output.len())
            .map_err(|e| self.device_error(op, e))?;
        self.call(op, |c| c.all_gather(&src, &mut dst).map(|_| ()))?;
        let host = self
            .device
            .clone_dtoh(&dst)
            .map_err(|e| self.device_error(op, e))?;
        output.copy_from_slice(&host);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Size(format!(
                "broadcast from rank {root} at world size {}",
                self.world
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.through_device("broadcast", buf, |c, d| {
            c.broadcast_in_place(d, root as i32).map(|_| ())
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    fn check(&self) -> Result<(), CommError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(CommError::Poisoned { rank: self.rank });
        }
        Ok(())
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, candle_core::Error> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let wide = t.to_dtype(DType::F32)?.contiguous()?;
        wide.apply_op1_no_bwd(&AllReduce(self))?.to_dtype(t.dtype())
    }
}

/// The device-side all-reduce as a candle op: a new f32 tensor holding the sum over ranks.
struct AllReduce<'a>(&'a NcclComm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "medley-nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("all-reduce: the tensor is not contiguous");
        };
        if s.dtype() != DType::F32 {
            candle_core::bail!("all-reduce: expected f32, got {:?}", s.dtype());
        }
        let src = s.as_cuda_slice::<f32>()?.slice(a..b);
        let dev = s.device.clone();
        let mut dst = dev.alloc_zeros::<f32>(b - a)?;
        self.0
            .call("all_reduce", |c| {
                c.all_reduce(&src, &mut dst, &ReduceOp::Sum).map(|_| ())
            })
            .map_err(candle_core::Error::from)?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
