//! Returning freed heap memory to the operating system.
//!
//! Each step allocates and frees activations, logits and KV buffers whose sizes change with the
//! batch. glibc keeps freed memory in its arenas, so a long-running shard's resident size ends
//! up reflecting the largest transient it has ever needed rather than what it holds now. The
//! engine thread trims the heap at most once per [`TRIM_INTERVAL`], after a reply is sent, so a
//! resident size that still grows under steady load points at a real leak.
//!
//! Between trims, freed memory stays where the next step finds it ([`keep_freed_memory`]):
//! glibc's default is to `mmap` each large buffer and to return memory at every `free`, so a
//! prefill step's activations (megabytes each, allocated and freed per projection) came back as
//! fresh pages that the kernel faulted in and zeroed every time.

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

/// Buffers below this size come from the heap, not from an `mmap` of their own.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of a heap that `free` leaves in place (the trims above return it).
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Makes freed buffers reusable without page faults: allocations under 32 MiB come from the
/// heap and `free` returns nothing to the system; `HeapTrimmer` does that between commands.
/// glibc's defaults (an `mmap` per buffer above 128 KiB, raised after frees, and a trim at every
/// `free` that leaves 128 KiB-256 MiB free at the top) made a 512-token SmolLM2 prefill fault in
/// up to ~1 GB of fresh pages; in alternating runs of the prefill bench the setting cut the
/// faults to those of loading the model and the prefill times by 9-27%. Process-wide: call it
/// once, before loading.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation parameters; it has no preconditions and
    // is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
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

    /// This thread's minor page faults so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_faults() -> i64 {
        // SAFETY: getrusage writes one struct it is given; RUSAGE_THREAD is Linux's.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// A buffer freed and allocated again is served from the same resident pages: writing it
    /// the second time faults in almost none of its 6,144 pages (glibc's default serves the
    /// first from an `mmap` and the second from fresh heap pages, faulting each in).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_buffers_come_back_without_page_faults() {
        keep_freed_memory();
        const LEN: usize = 24 << 20;
        let fill = || {
            let mut v = vec![0u8; LEN];
            v.iter_mut().step_by(4096).for_each(|b| *b = 1);
            std::hint::black_box(&v);
        };
        fill();
        let before = thread_faults();
        fill();
        let faults = thread_faults() - before;
        assert!(faults < (LEN / 4096 / 8) as i64, "{faults} page faults");
    }

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
