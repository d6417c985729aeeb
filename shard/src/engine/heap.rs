//! Returning freed heap memory to the operating system.
//!
//! Each step allocates and frees activations, logits and KV buffers whose sizes change with the
//! batch. glibc keeps freed memory in its arenas, so a long-running shard's resident size ends
//! up reflecting the largest transient it has ever needed rather than what it holds now. The
//! engine thread trims the heap at most once per [`TRIM_INTERVAL`], after a reply is sent, so a
//! resident size that still grows under steady load points at a real leak.

use std::time::{Duration, Instant};

/// Default shortest time between two trims (a trim of a few GiB of heap takes a few
/// milliseconds); `--heap-trim-interval-ms` changes it.
pub(crate) const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Rate-limits heap trims.
#[derive(Debug)]
pub(crate) struct HeapTrimmer {
    interval: Duration,
    last: Instant,
}

impl HeapTrimmer {
    /// A trimmer that trims at most once per `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Instant::now(),
        }
    }

    /// Trims when `interval` has passed since the last trim; returns whether it did.
    pub(crate) fn maybe_trim(&mut self) -> bool {
        if self.last.elapsed() < self.interval {
            return false;
        }
        trim();
        self.last = Instant::now();
        true
    }
}

/// Releases free memory at the top of the heap and free whole pages inside every arena.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and releases memory the allocator holds as free; it has
    // no preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_at_most_once_per_interval() {
        let mut t = HeapTrimmer::new(Duration::from_secs(3600));
        assert!(!t.maybe_trim());
        let mut t = HeapTrimmer::new(Duration::ZERO);
        // Freed memory exists to release: the trim must not disturb live allocations.
        let live = vec![7u8; 1 << 20];
        drop(vec![1u8; 64 << 20]);
        assert!(t.maybe_trim());
        assert!(t.maybe_trim());
        assert!(live.iter().all(|&b| b == 7));
    }
}
