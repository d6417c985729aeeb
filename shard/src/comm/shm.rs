//! The CPU backend of [`Comm`]: the ranks of a group are processes on one machine that map the
//! same file (on `/dev/shm`, a memory file system) and synchronise with a barrier on a shared
//! word (spinning briefly, then sleeping on a futex).
//!
//! Layout: a 4 KiB header (barrier counters, the group's shape) and two sets of `world` slots of
//! `slot_elems` f32 each. A collective moves its data in rounds of at most `slot_elems` values;
//! round `k` uses slot set `k % 2`: each rank writes its slot, all meet at the barrier, each reads
//! what it needs. One barrier per round is enough because a rank can only write set `k % 2` again
//! in round `k + 2`, after the barrier of round `k + 1`, which no rank reaches before it has
//! finished reading round `k`.
//!
//! A rank that does not arrive within the timeout (hung, or out of step) makes the waiting rank
//! fail and poison the group, so every rank fails fast from then on instead of hanging. A rank
//! whose process has exited is noticed sooner: every rank records its pid, and a waiting rank
//! checks its peers each time it wakes (at least every 100 ms).

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};

use super::{Comm, CommError, futex};

/// Bytes before the first slot.
const HEADER_BYTES: usize = 4096;
/// Barrier polls before sleeping on the futex (a few microseconds).
const SPINS: u32 = 4000;
/// Longest single futex sleep (the timeout and the poison flag are re-checked after each).
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// Word offsets in the header.
const ARRIVED: usize = 0;
const GENERATION: usize = 1;
const POISONED: usize = 2;
const WORLD: usize = 3;
const SLOT_ELEMS: usize = 4;
/// First of the words holding each rank's process id (0 until it joins).
const PIDS: usize = 8;

/// How to join a shared-memory group.
#[derive(Debug, Clone)]
pub struct ShmCommConfig {
    /// The shared file, the same for every rank and unique to the group (the launcher names it;
    /// rank 0 removes it once every rank has joined).
    pub path: PathBuf,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Values per slot, i.e. per round of a collective.
    pub slot_elems: usize,
    /// Longest wait for the other ranks at any collective (and for all to join).
    pub timeout: Duration,
}

impl ShmCommConfig {
    /// Rank `rank` of `world_size` on `path`, with 1 Mi values per slot and a 30 s timeout.
    pub fn new(path: impl Into<PathBuf>, rank: usize, world_size: usize) -> Self {
        Self {
            path: path.into(),
            rank,
            world_size,
            slot_elems: 1 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The two halves of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the barrier: write this rank's slot.
    Write,
    /// After the barrier: read the slots.
    Read,
}

/// One rank of a shared-memory group.
pub struct ShmComm {
    rank: usize,
    world: usize,
    slot_elems: usize,
    timeout: Duration,
    path: PathBuf,
    _map: MmapMut,
    /// Start of the mapping (kept from `_map`, which stays mapped as long as `self`).
    base: *mut u8,
    /// Rounds done by this rank (their parity picks the slot set); the lock also serialises
    /// collectives called from several threads of one rank.
    rounds: Mutex<u64>,
}

// SAFETY: the mapping is shared memory accessed only through atomics (header) and, for slots,
// under the round/barrier protocol described in the module docs; `base` points into `_map`,
// which lives as long as the value.
unsafe impl Send for ShmComm {}
// SAFETY: as above; the round lock serialises a rank's own collectives.
unsafe impl Sync for ShmComm {}

impl std::fmt::Debug for ShmComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("slot_elems", &self.slot_elems)
            .field("path", &self.path)
            .finish()
    }
}

impl ShmComm {
    /// Maps the group's file (creating it if this rank is first) and waits until every rank has
    /// joined; rank 0 then removes the file (the mappings stay).
    pub fn join(cfg: &ShmCommConfig) -> Result<Self, CommError> {
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size || cfg.slot_elems == 0 {
            return Err(CommError::Size(format!(
                "rank {} of {} with {} values per slot",
                cfg.rank, cfg.world_size, cfg.slot_elems
            )));
        }
        let slot_elems = u32::try_from(cfg.slot_elems)
            .map_err(|_| CommError::Size(format!("{} values per slot", cfg.slot_elems)))?;
        let world = u32::try_from(cfg.world_size)
            .ok()
            .filter(|_| PIDS + cfg.world_size <= HEADER_BYTES / 4)
            .ok_or_else(|| CommError::Size(format!("world size {}", cfg.world_size)))?;
        let bytes = HEADER_BYTES + 2 * cfg.world_size * cfg.slot_elems * 4;
        let io = |source| CommError::Io {
            path: cfg.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cfg.path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < bytes as u64 {
            file.set_len(bytes as u64).map_err(io)?;
        }
        // Reserve the space now: on a full memory file system (a container's small /dev/shm)
        // touching an unbacked page of the mapping later would kill the process with SIGBUS.
        // SAFETY: the descriptor is open for writing for the duration of the call.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t)
        };
        if rc != 0 {
            return Err(CommError::NoSpace {
                path: cfg.path.clone(),
                bytes,
                reason: std::io::Error::from_raw_os_error(rc).to_string(),
            });
        }
        // SAFETY: the file is only ever mapped by the ranks of this group, which access it under
        // the protocol in the module docs.
        let mut map = unsafe { MmapOptions::new().len(bytes).map_mut(&file) }.map_err(io)?;
        let base = map.as_mut_ptr();
        let comm = Self {
            rank: cfg.rank,
            world: cfg.world_size,
            slot_elems: cfg.slot_elems,
            timeout: cfg.timeout,
            path: cfg.path.clone(),
            _map: map,
            base,
            rounds: Mutex::new(0),
        };
        comm.claim_shape(WORLD, world)?;
        comm.claim_shape(SLOT_ELEMS, slot_elems)?;
        comm.word(PIDS + comm.rank)
            .store(std::process::id(), Ordering::Release);
        comm.wait_all("join")?;
        if comm.rank == 0 {
            let _ = std::fs::remove_file(&comm.path);
        }
        Ok(comm)
    }

    /// Header word `i`.
    fn word(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the header holds HEADER_BYTES / 4 aligned u32 words (the mapping is
        // page-aligned), only accessed atomically.
        unsafe { &*(self.base.cast::<AtomicU32>().add(i)) }
    }

    /// Records the group's shape, or checks it against the first rank's.
    fn claim_shape(&self, i: usize, value: u32) -> Result<(), CommError> {
        match self
            .word(i)
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(v) if v == value => Ok(()),
            Err(v) => Err(CommError::Size(format!(
                "{}: rank {} expects {value} where the group has {v} (header word {i})",
                self.path.display(),
                self.rank
            ))),
        }
    }

    /// The first value of rank `rank`'s slot in set `set`.
    fn slot(&self, set: usize, rank: usize) -> *mut f32 {
        let index = (set * self.world + rank) * self.slot_elems;
        // SAFETY: set < 2 and rank < world, so the slot lies inside the mapping (see `join`).
        unsafe { self.base.add(HEADER_BYTES).cast::<f32>().add(index) }
    }

    /// Marks the group failed and wakes every waiter.
    fn poison(&self) {
        self.word(POISONED).store(1, Ordering::Release);
        futex::wake_all(self.word(GENERATION));
    }

    /// A rank whose process no longer exists (it recorded its pid when it joined): waiting for
    /// it would only end at the timeout.
    fn dead_peer(&self) -> Option<(usize, u32)> {
        (0..self.world).filter(|&r| r != self.rank).find_map(|r| {
            let pid = self.word(PIDS + r).load(Ordering::Acquire);
            if pid == 0 || pid == std::process::id() {
                return None;
            }
            // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
            let gone = unsafe { libc::kill(pid as libc::pid_t, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            gone.then_some((r, pid))
        })
    }

    /// The barrier (sense by generation): the last rank to arrive resets the count and advances
    /// the generation; the others wait for the generation to change.
    fn wait_all(&self, op: &'static str) -> Result<(), CommError> {
        let (arrived, generation) = (self.word(ARRIVED), self.word(GENERATION));
        if self.word(POISONED).load(Ordering::Acquire) != 0 {
            return Err(CommError::Poisoned { rank: self.rank });
        }
        let current = generation.load(Ordering::Acquire);
        if arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.world as u32 {
            arrived.store(0, Ordering::Relaxed);
            generation.fetch_add(1, Ordering::Release);
            futex::wake_all(generation);
            return Ok(());
        }
        let start = Instant::now();
        let mut spins = 0;
        loop {
            if generation.load(Ordering::Acquire) != current {
                return Ok(());
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            Comm::check(self)?;
            let waited = start.elapsed();
            if waited >= self.timeout {
                self.poison();
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    waited,
                });
            }
            futex::wait(generation, current, (self.timeout - waited).min(MAX_SLEEP));
        }
    }

    /// Moves `n` values in rounds of at most `slot_elems`: for each round, `step(Phase::Write,
    /// set, offset, len)`, the barrier, then `step(Phase::Read, ...)`.
    fn rounds(
        &self,
        op: &'static str,
        n: usize,
        mut step: impl FnMut(Phase, usize, usize, usize),
    ) -> Result<(), CommError> {
        let mut rounds = self
            .rounds
            .lock()
            .map_err(|_| CommError::Poisoned { rank: self.rank })?;
        let mut offset = 0;
        while offset < n {
            let len = (n - offset).min(self.slot_elems);
            let set = (*rounds % 2) as usize;
            *rounds += 1;
            step(Phase::Write, set, offset, len);
            self.wait_all(op)?;
            step(Phase::Read, set, offset, len);
            offset += len;
        }
        Ok(())
    }

    /// The first `len` values of rank `rank`'s slot in set `set`, to read after the barrier.
    fn slot_values(&self, set: usize, rank: usize, len: usize) -> &[f32] {
        // SAFETY: len <= slot_elems; no rank writes this set until two rounds later (module docs).
        unsafe { std::slice::from_raw_parts(self.slot(set, rank), len) }
    }

    /// Copies `values` into this rank's slot of set `set`.
    fn write_slot(&self, set: usize, values: &[f32]) {
        debug_assert!(values.len() <= self.slot_elems);
        // SAFETY: the slot holds slot_elems values and only this rank writes it, in a round in
        // which no rank reads it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), self.slot(set, self.rank), values.len())
        }
    }
}

impl Comm for ShmComm {
    fn check(&self) -> Result<(), CommError> {
        if self.word(POISONED).load(Ordering::Acquire) != 0 {
            return Err(CommError::Poisoned { rank: self.rank });
        }
        if let Some((peer, pid)) = self.dead_peer() {
            self.poison();
            return Err(CommError::PeerGone {
                rank: self.rank,
                peer,
                pid,
            });
        }
        Ok(())
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let n = buf.len();
        self.rounds("all_reduce_sum", n, |phase, set, off, len| {
            let out = &mut buf[off..off + len];
            match phase {
                Phase::Write => self.write_slot(set, out),
                Phase::Read => {
                    out.copy_from_slice(self.slot_values(set, 0, len));
                    for r in 1..self.world {
                        for (o, v) in out.iter_mut().zip(self.slot_values(set, r, len)) {
                            *o += v;
                        }
                    }
                }
            }
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = input.len();
        if output.len() != n * self.world {
            return Err(CommError::Size(format!(
                "all_gather: output of {} for {} ranks of {n}",
                output.len(),
                self.world
            )));
        }
        self.rounds("all_gather", n, |phase, set, off, len| match phase {
            Phase::Write => self.write_slot(set, &input[off..off + len]),
            Phase::Read => {
                for r in 0..self.world {
                    output[r * n + off..r * n + off + len]
                        .copy_from_slice(self.slot_values(set, r, len));
                }
            }
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Size(format!(
                "broadcast from rank {root} of {}",
                self.world
            )));
        }
        let n = buf.len();
        let me = self.rank;
        self.rounds("broadcast", n, |phase, set, off, len| match phase {
            Phase::Write if me == root => self.write_slot(set, &buf[off..off + len]),
            Phase::Read if me != root => {
                buf[off..off + len].copy_from_slice(self.slot_values(set, root, len))
            }
            _ => {}
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let _rounds = self
            .rounds
            .lock()
            .map_err(|_| CommError::Poisoned { rank: self.rank })?;
        self.wait_all("barrier")
    }
}

#[cfg(test)]
#[path = "shm_tests.rs"]
pub(crate) mod tests;
