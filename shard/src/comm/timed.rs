//! [`Timed`]: a [`Comm`] that adds up the time its collectives take (waiting for the other
//! ranks included), so every step can report how much of it went to communication.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Tensor;

use super::{Comm, CommError};

/// Wraps a communicator and counts the nanoseconds spent in its collectives.
#[derive(Debug)]
pub struct Timed {
    inner: Arc<dyn Comm>,
    ns: AtomicU64,
}

impl Timed {
    /// Times the collectives of `inner`.
    pub fn new(inner: Arc<dyn Comm>) -> Self {
        Self {
            inner,
            ns: AtomicU64::new(0),
        }
    }

    /// Nanoseconds spent in collectives since the last call.
    pub fn take_ns(&self) -> u64 {
        self.ns.swap(0, Ordering::Relaxed)
    }

    fn timed<T>(&self, op: impl FnOnce() -> T) -> T {
        // A group of one has nothing to wait for; do not read the clock for it.
        if self.inner.world_size() == 1 {
            return op();
        }
        let t0 = Instant::now();
        let out = op();
        self.ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl Comm for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.timed(|| self.inner.all_reduce_sum(buf))
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        self.timed(|| self.inner.all_gather(input, output))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.timed(|| self.inner.broadcast(buf, root))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.timed(|| self.inner.barrier())
    }

    fn check(&self) -> Result<(), CommError> {
        self.inner.check()
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor, candle_core::Error> {
        // The inner backend's own tensor path (a device backend keeps the data on the device).
        self.timed(|| self.inner.all_reduce_sum_tensor(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_time_only_for_real_groups_and_delegates() {
        let single = Timed::new(Arc::new(super::super::Single));
        let mut v = [1.0f32, 2.0];
        single.all_reduce_sum(&mut v).expect("identity");
        assert_eq!(v, [1.0, 2.0]);
        assert_eq!(single.take_ns(), 0);
        assert!(single.check().is_ok());
        assert_eq!((single.rank(), single.world_size()), (0, 1));
    }
}
