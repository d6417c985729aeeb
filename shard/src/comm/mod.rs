//! Collectives between the ranks of one tensor-parallel group, behind one [`Comm`] trait that
//! knows nothing of layers.
//!
//! * [`Single`] — world size 1: every collective is the identity.
//! * [`ShmComm`] — ranks as processes on one machine, exchanging data through one shared-memory
//!   file (no sockets on the hot path): the CPU backend, used by tests and CPU serving.
//! * [`Timed`] — wraps another and adds up the time spent in collectives (per-step timings).
//! * `NcclComm` (the `cuda` feature, module `nccl`) — ranks on GPUs of their own, collectives
//!   on the device; it overrides [`Comm::all_reduce_sum_tensor`] to keep the data there instead
//!   of taking the host path.
//!
//! [`backend`] decides which one a group uses (`--tp-comm auto|shm|nccl`).
//!
//! Every collective is called by every rank in the same order (the router sends each batch call
//! to all ranks from one task). Results are bitwise identical on every rank: sums are taken in
//! rank order, so all ranks hold the same activations and sample the same tokens.

pub mod backend;
mod futex;
#[cfg(feature = "cuda")]
pub mod nccl;
mod shm;
mod timed;

use std::time::Duration;

use candle_core::{DType, Tensor};

pub use backend::{CommBackend, CommKind};
#[cfg(test)]
pub(crate) use shm::tests::on_ranks;
pub use shm::{ShmComm, ShmCommConfig};
pub use timed::Timed;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// Another rank did not reach the collective in time (it died, hangs, or diverged).
    #[error("rank {rank}: {op} timed out after {waited:?} waiting for the other ranks")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// Another rank's process exited while this one waited for it.
    #[error("rank {rank}: rank {peer} (pid {pid}) exited; the tensor-parallel group is broken")]
    PeerGone {
        /// This rank.
        rank: usize,
        /// The rank that is gone.
        peer: usize,
        /// Its process id.
        pid: u32,
    },
    /// A rank gave up on the group before (timeout or failure): the group must be restarted.
    #[error("rank {rank}: the communicator is poisoned (a rank failed earlier)")]
    Poisoned {
        /// This rank.
        rank: usize,
    },
    /// An NCCL call (or a device copy around one) failed; the group must be restarted.
    #[error("rank {rank}: NCCL {op} failed: {reason}")]
    Nccl {
        /// This rank.
        rank: usize,
        /// The call.
        op: &'static str,
        /// What NCCL or the device said.
        reason: String,
    },
    /// Buffers of the wrong size.
    #[error("{0}")]
    Size(String),
    /// The shared-memory file system cannot hold the group's buffers.
    #[error(
        "shared memory {path}: cannot reserve {bytes} bytes ({reason}); is the file system \
         (/dev/shm, a container's --shm-size) large enough?"
    )]
    NoSpace {
        /// The file.
        path: std::path::PathBuf,
        /// Bytes the group needs.
        bytes: usize,
        /// What the system said.
        reason: String,
    },
    /// The shared-memory file could not be set up.
    #[error("shared memory {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<CommError> for candle_core::Error {
    fn from(e: CommError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// The collectives of one rank in a group of [`Comm::world_size`] ranks.
pub trait Comm: Send + Sync + std::fmt::Debug {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every rank's `buf` (same length everywhere),
    /// added in rank order, so every rank gets the same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// `output` (`world_size * input.len()`) becomes every rank's `input`, in rank order.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// `buf` becomes `root`'s `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;

    /// Whether the group can still run collectives, without taking part in one: a failed or
    /// timed-out collective earlier, or a peer process that is gone, make it `Err` (the group
    /// must then be restarted). Cheap; called by health checks from any thread.
    fn check(&self) -> Result<(), CommError> {
        Ok(())
    }

    /// The element-wise sum over ranks of `t` (any float dtype and shape), in `t`'s dtype: each
    /// rank's partial is widened to f32, summed in rank order, and rounded once. The default
    /// takes the host path (what the CPU backend needs); a device backend overrides it.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, candle_core::Error> {
        if self.world_size() == 1 {
            return Ok(t.clone());
        }
        let mut host = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())
    }
}

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        if output.len() != input.len() {
            return Err(CommError::Size(format!(
                "all_gather: output of {} for an input of {} at world size 1",
                output.len(),
                input.len()
            )));
        }
        output.copy_from_slice(input);
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root != 0 {
            return Err(CommError::Size(format!(
                "broadcast from rank {root} at world size 1"
            )));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn single_is_the_identity() {
        let c = Single;
        let mut v = vec![1.0f32, -2.0, 3.5];
        c.all_reduce_sum(&mut v).expect("reduce");
        assert_eq!(v, [1.0, -2.0, 3.5]);
        let mut out = vec![0.0; 3];
        c.all_gather(&v, &mut out).expect("gather");
        assert_eq!(out, v);
        assert!(c.all_gather(&v, &mut [0.0; 6]).is_err());
        c.broadcast(&mut v, 0).expect("broadcast");
        assert!(c.broadcast(&mut v, 1).is_err());
        c.barrier().expect("barrier");
        let t = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).expect("t");
        let r = c.all_reduce_sum_tensor(&t).expect("tensor");
        assert_eq!(r.to_vec2::<f32>().expect("v"), [[1.0, 2.0]]);
    }
}
