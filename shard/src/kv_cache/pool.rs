//! Bookkeeping of the block pool: which blocks are free, which are in use and by how many
//! sequences, and which hold a cached prefix block (content-addressed by its chain hash).
//!
//! No tensors here: [`super::KvCache`] owns the storage and asks the pool for block numbers.
//! A block is in exactly one of three states:
//! * **in use** — `refcount > 0` (shared by several sequences when `refcount > 1`);
//! * **idle cached** — `refcount == 0` and registered under a hash: its contents stay valid
//!   and a later sequence with the same prefix can take it back; it is evicted, least
//!   recently released first, when the pool needs a block;
//! * **free** — `refcount == 0`, no hash.
//!
//! Every decision is deterministic (no hash-map iteration order is ever observed), so the
//! ranks of a tensor-parallel group, fed the same calls, make the same choices.

use std::collections::{BTreeMap, HashMap};

/// Content address of a full block: a digest of the previous block's hash, the adapter
/// identity and the block's token ids (see [`super::prefix::block_hash`]).
pub type BlockHash = [u8; 16];

/// Free, in-use and cached blocks of one pool.
#[derive(Debug)]
pub struct BlockPool {
    refcount: Vec<u32>,
    /// The hash a block is registered under (cached blocks only).
    hash_of: Vec<Option<BlockHash>>,
    /// Blocks that hold nothing, used last-in first-out.
    free: Vec<u32>,
    /// Registered blocks by hash (in use or idle).
    cached: HashMap<BlockHash, u32>,
    /// Idle cached blocks by release tick (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Release tick of each idle block (to find it in `idle`).
    idle_tick: Vec<u64>,
    tick: u64,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> Self {
        Self {
            refcount: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            // Reversed so that blocks are handed out in increasing order.
            free: (0..num_blocks as u32).rev().collect(),
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            idle_tick: vec![0; num_blocks],
            tick: 0,
            evictions: 0,
        }
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks a new allocation can take: free ones plus idle cached ones (evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks held by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks() - self.available()
    }

    /// Idle blocks kept for their cached prefix.
    pub fn idle_cached(&self) -> usize {
        self.idle.len()
    }

    /// Cached blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Sequences holding `block`.
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// Takes a block for writing (refcount 1): a free one, else the least recently released
    /// idle cached one, whose hash is forgotten. `None` when every block is in use.
    pub fn alloc(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                self.evictions += 1;
                b
            }
        };
        self.refcount[block as usize] = 1;
        Some(block)
    }

    /// Takes a free block (refcount 1), never evicting a cached one. `None` when none is free.
    pub fn alloc_free(&mut self) -> Option<u32> {
        let block = self.free.pop()?;
        self.refcount[block as usize] = 1;
        Some(block)
    }

    /// Adds a holder to an in-use block (a fork).
    pub fn retain(&mut self, block: u32) {
        self.refcount[block as usize] += 1;
    }

    /// Drops a holder; the last one makes the block idle cached (if registered) or free.
    pub fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refcount[b] > 0, "release of a free block {block}");
        self.refcount[b] = self.refcount[b].saturating_sub(1);
        if self.refcount[b] > 0 {
            return;
        }
        if self.hash_of[b].is_some() {
            self.tick += 1;
            self.idle.insert(self.tick, block);
            self.idle_tick[b] = self.tick;
        } else {
            self.free.push(block);
        }
    }

    /// The block cached under `hash`, taken for one more holder (an idle block comes back
    /// into use).
    pub fn lookup(&mut self, hash: &BlockHash) -> Option<u32> {
        let block = *self.cached.get(hash)?;
        let b = block as usize;
        if self.refcount[b] == 0 {
            self.idle.remove(&self.idle_tick[b]);
        }
        self.refcount[b] += 1;
        Some(block)
    }

    /// Whether a block is cached under `hash`.
    #[cfg(test)]
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.cached.contains_key(hash)
    }

    /// Registers an in-use, full block under `hash`. Returns false (and changes nothing) when
    /// another block already holds that content or this block is registered already.
    pub fn register(&mut self, block: u32, hash: BlockHash) -> bool {
        let b = block as usize;
        if self.hash_of[b].is_some() || self.cached.contains_key(&hash) {
            return false;
        }
        self.hash_of[b] = Some(hash);
        self.cached.insert(hash, block);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u8) -> BlockHash {
        [x; 16]
    }

    #[test]
    fn alloc_release_and_refcounts() {
        let mut p = BlockPool::new(3);
        let (a, b, c) = (p.alloc().unwrap(), p.alloc().unwrap(), p.alloc().unwrap());
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!((p.alloc(), p.available(), p.in_use()), (None, 0, 3));
        p.retain(b);
        p.release(b);
        assert_eq!((p.refcount(b), p.available()), (1, 0), "still held once");
        p.release(b);
        assert_eq!((p.refcount(b), p.available()), (0, 1));
        assert_eq!(p.alloc(), Some(b), "the freed block is reused");
    }

    #[test]
    fn cached_blocks_idle_then_evicted_least_recently_released_first() {
        let mut p = BlockPool::new(3);
        let blocks: Vec<u32> = (0..3).map(|_| p.alloc().unwrap()).collect();
        for (i, b) in blocks.iter().enumerate() {
            assert!(p.register(*b, h(i as u8)));
        }
        assert!(!p.register(blocks[0], h(9)), "registered once");
        // Release 2, then 0, then 1: eviction order 2, 0, 1.
        for b in [2, 0, 1] {
            p.release(blocks[b]);
        }
        assert_eq!((p.idle_cached(), p.available(), p.in_use()), (3, 3, 0));
        // A hit takes block 0 back out of the idle list.
        assert_eq!(p.lookup(&h(0)), Some(blocks[0]));
        assert_eq!((p.idle_cached(), p.refcount(blocks[0])), (2, 1));
        assert_eq!(p.alloc(), Some(blocks[2]), "oldest idle first");
        assert!(!p.contains(&h(2)), "evicted hash forgotten");
        assert_eq!(p.alloc(), Some(blocks[1]));
        assert_eq!((p.alloc(), p.evictions()), (None, 2));
        assert!(p.contains(&h(0)), "the block in use keeps its hash");
    }

    #[test]
    fn one_block_per_content() {
        let mut p = BlockPool::new(2);
        let (a, b) = (p.alloc().unwrap(), p.alloc().unwrap());
        assert!(p.register(a, h(1)));
        assert!(!p.register(b, h(1)), "duplicate content stays unregistered");
        p.release(b);
        assert_eq!(
            p.idle_cached(),
            0,
            "an unregistered block goes back to free"
        );
        p.release(a);
        assert_eq!((p.idle_cached(), p.lookup(&h(1))), (1, Some(a)));
    }
}
