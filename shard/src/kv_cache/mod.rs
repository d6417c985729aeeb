//! Paged key/value storage: one pool of fixed-size blocks per shard, a block table per
//! sequence, reference counts with copy-on-write, and a prefix cache over full blocks.
//!
//! Layout: for each layer one K and one V tensor of shape `[num_blocks * block_tokens,
//! kv_heads, head_dim]` (slot-major, the "NHD" layout of paged-attention kernels): the token at
//! position `p` of a sequence lives in slot `table[p / block_tokens] * block_tokens + p %
//! block_tokens`, its heads side by side. Writing a token is one contiguous row; attention
//! reads keys through the block table (see `model::paged_attention`), or gathers them where
//! no paged kernel exists yet.
//!
//! Blocks are taken as tokens are written, so a sequence holds at most one partly filled
//! block. With prefix caching on, every full block of a caching sequence is registered under
//! its chain hash ([`prefix::block_hash`]: previous block, adapter identity, token ids); a new
//! sequence takes the longest cached chain of its prompt and computes only the rest. Released
//! cached blocks stay valid until the pool evicts them, least recently released first.

mod pool;
pub mod prefix;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::model::ModelConfig;
pub use pool::BlockHash;
use pool::BlockPool;
pub use prefix::AdapterIdentity;

/// Default tokens per block: small enough that a sequence wastes little in its last block
/// and that shared prefixes are found at a fine grain, large enough that block tables stay
/// short and a GPU kernel reads whole cache lines per block (16 is also vLLM's default).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Errors of the KV cache.
#[derive(Debug, thiserror::Error)]
pub enum KvCacheError {
    /// The pool has too few blocks for a step; the engine preempts a sequence and retries.
    #[error("kv cache full: {needed} blocks needed, {available} of {total} available")]
    OutOfBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free or evictable.
        available: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// `allocate` was called twice for the same sequence.
    #[error("sequence {0} already has a kv cache entry")]
    DuplicateSequence(u64),
    /// The sequence was never allocated (or already freed).
    #[error("sequence {0} has no kv cache entry")]
    UnknownSequence(u64),
    /// A write would go past the sequence's declared maximum.
    #[error("sequence {seq_id}: {needed} tokens exceed its maximum of {reserved}")]
    ExceedsReservation {
        /// Sequence.
        seq_id: u64,
        /// Tokens the sequence would hold.
        needed: usize,
        /// Tokens declared at `allocate`.
        reserved: usize,
    },
    /// A layer index, a position or a tensor shape does not match the cache.
    #[error("kv cache misuse: {0}")]
    Invalid(String),
    /// Tensor operation failure.
    #[error("kv cache tensor error: {}", crate::model::error_text::Plain(.0))]
    Candle(#[from] candle_core::Error),
}

/// Size and policy of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Tokens the pool holds (rounded down to whole blocks, at least one block).
    pub capacity_tokens: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Keep full blocks for reuse by later sequences with the same prefix and adapter.
    pub prefix_caching: bool,
}

impl KvCacheConfig {
    /// `capacity_tokens` in blocks of [`DEFAULT_BLOCK_TOKENS`], prefix caching off.
    pub fn tokens(capacity_tokens: usize) -> Self {
        Self {
            capacity_tokens,
            block_tokens: DEFAULT_BLOCK_TOKENS,
            prefix_caching: false,
        }
    }
}

/// Counters of the pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvStats {
    /// Tokens per block.
    pub block_tokens: usize,
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks held by sequences.
    pub used_blocks: usize,
    /// Idle blocks kept for their prefix.
    pub cached_blocks: usize,
    /// Cached blocks evicted since start.
    pub evictions: u64,
}

/// The prefix-cache state of a caching sequence.
#[derive(Debug, Clone)]
struct SeqPrefix {
    identity: AdapterIdentity,
    /// Committed tokens (those of registered blocks and of the partial last block).
    tokens: Vec<u32>,
    /// Chain hash of each full block so far.
    chain: Vec<BlockHash>,
}

/// One sequence's block table.
#[derive(Debug, Clone)]
struct SeqEntry {
    /// Largest length the sequence may reach.
    max_tokens: usize,
    /// Tokens committed (visible to attention).
    len: usize,
    /// Block of each `block_tokens` positions.
    blocks: Vec<u32>,
    prefix: Option<SeqPrefix>,
}

/// Shape of the stored heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The block pool of one shard with every sequence's block table.
pub struct KvCache {
    shape: Shape,
    dtype: DType,
    device: Device,
    block_tokens: usize,
    prefix_caching: bool,
    /// Per layer `(k, v)`, each `[num_blocks * block_tokens, kv_heads, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    pool: BlockPool,
    seqs: HashMap<u64, SeqEntry>,
    /// The block padding rows write into ([`KvCache::pad_block`]).
    pad: Option<u32>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("block_tokens", &self.block_tokens)
            .field("blocks", &self.pool.num_blocks())
            .field("used_blocks", &self.pool.in_use())
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl KvCache {
    /// A pool for a model with configuration `cfg`, storing K/V in `dtype` on `device`.
    /// The storage is allocated here (zeroed; on the CPU the OS maps pages lazily).
    pub fn new(
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
        config: KvCacheConfig,
    ) -> Result<Self, KvCacheError> {
        if config.block_tokens == 0 {
            return Err(KvCacheError::Invalid("block size 0".into()));
        }
        let num_blocks = (config.capacity_tokens / config.block_tokens).max(1);
        let shape = Shape {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        let slots = num_blocks * config.block_tokens;
        let mut layers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            let k = Tensor::zeros((slots, shape.kv_heads, shape.head_dim), dtype, device)?;
            let v = Tensor::zeros((slots, shape.kv_heads, shape.head_dim), dtype, device)?;
            layers.push((k, v));
        }
        Ok(Self {
            shape,
            dtype,
            device: device.clone(),
            block_tokens: config.block_tokens,
            prefix_caching: config.prefix_caching,
            layers,
            pool: BlockPool::new(num_blocks),
            seqs: HashMap::new(),
            pad: None,
        })
    }

    /// Bytes of K and V one token occupies over all layers.
    pub fn bytes_per_token(cfg: &ModelConfig, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    /// Registers a sequence that may grow to `max_tokens`, with no cached prefix. Memory is
    /// taken only as tokens are written ([`KvCache::reserve`]).
    pub fn allocate(&mut self, seq_id: u64, max_tokens: usize) -> Result<(), KvCacheError> {
        self.insert(seq_id, max_tokens, None, &[]).map(|_| ())
    }

    /// Registers a sequence computed under `identity` whose first tokens will be `tokens`.
    /// With prefix caching on it takes the longest cached chain of full blocks of
    /// `tokens[..tokens.len() - 1]` (the last token is always computed: its logits pick the
    /// next one) and registers its own blocks as they fill. Returns the tokens already
    /// cached: the sequence's length.
    pub fn allocate_cached(
        &mut self,
        seq_id: u64,
        max_tokens: usize,
        identity: AdapterIdentity,
        tokens: &[u32],
    ) -> Result<usize, KvCacheError> {
        if !self.prefix_caching {
            return self.allocate(seq_id, max_tokens).map(|_| 0);
        }
        self.insert(seq_id, max_tokens, Some(identity), tokens)
    }

    fn insert(
        &mut self,
        seq_id: u64,
        max_tokens: usize,
        identity: Option<AdapterIdentity>,
        tokens: &[u32],
    ) -> Result<usize, KvCacheError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(KvCacheError::DuplicateSequence(seq_id));
        }
        let mut entry = SeqEntry {
            max_tokens,
            len: 0,
            blocks: vec![],
            prefix: identity.map(|identity| SeqPrefix {
                identity,
                tokens: vec![],
                chain: vec![],
            }),
        };
        if let Some(p) = &mut entry.prefix {
            let bt = self.block_tokens;
            let reusable = tokens.len().saturating_sub(1).min(max_tokens) / bt;
            for block_tokens in tokens.chunks_exact(bt).take(reusable) {
                let hash = prefix::block_hash(p.chain.last(), &p.identity, block_tokens);
                let Some(block) = self.pool.lookup(&hash) else {
                    break;
                };
                entry.blocks.push(block);
                p.chain.push(hash);
                p.tokens.extend_from_slice(block_tokens);
            }
            entry.len = entry.blocks.len() * bt;
        }
        let hit = entry.len;
        self.seqs.insert(seq_id, entry);
        Ok(hit)
    }

    /// A new sequence `dst` sharing every block of `src` (its blocks' reference counts go
    /// up; the first write into the shared partial last block copies it).
    pub fn fork(&mut self, src: u64, dst: u64) -> Result<(), KvCacheError> {
        if self.seqs.contains_key(&dst) {
            return Err(KvCacheError::DuplicateSequence(dst));
        }
        let entry = self.entry(src)?.clone();
        for b in &entry.blocks {
            self.pool.retain(*b);
        }
        self.seqs.insert(dst, entry);
        Ok(())
    }

    /// Releases a sequence's blocks (no-op for an unknown id). Its registered blocks stay
    /// cached until evicted; the last ones are released first, so a prefix's head outlives
    /// its tail.
    pub fn free(&mut self, seq_id: u64) {
        if let Some(e) = self.seqs.remove(&seq_id) {
            for b in e.blocks.iter().rev() {
                self.pool.release(*b);
            }
        }
    }

    /// Tokens stored for `seq_id`, or `None` when it is not allocated.
    pub fn len(&self, seq_id: u64) -> Option<usize> {
        self.seqs.get(&seq_id).map(|e| e.len)
    }

    /// The block table of `seq_id`.
    pub fn blocks(&self, seq_id: u64) -> Option<&[u32]> {
        self.seqs.get(&seq_id).map(|e| e.blocks.as_slice())
    }

    /// A block no sequence holds, for the padding rows of CUDA graph steps to write their
    /// keys and values into (`BatchPlan::padded`): taken from the free blocks on first use
    /// (never evicting a cached one) and kept until [`KvCache::release_pad_block`]. `None`
    /// when no block is free.
    pub fn pad_block(&mut self) -> Option<u32> {
        if self.pad.is_none() {
            self.pad = self.pool.alloc_free();
        }
        self.pad
    }

    /// The pad block, if one is held ([`KvCache::pad_block`]).
    pub fn held_pad_block(&self) -> Option<u32> {
        self.pad
    }

    /// Gives the pad block back to the pool (a sequence needs it); `true` when one was held.
    pub fn release_pad_block(&mut self) -> bool {
        let Some(block) = self.pad.take() else {
            return false;
        };
        self.pool.release(block);
        true
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Tokens the pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.pool.num_blocks() * self.block_tokens
    }

    /// Blocks a step could still take (free plus evictable cached ones).
    pub fn available_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Number of allocated sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Pool counters.
    pub fn stats(&self) -> KvStats {
        KvStats {
            block_tokens: self.block_tokens,
            total_blocks: self.pool.num_blocks(),
            used_blocks: self.pool.in_use(),
            cached_blocks: self.pool.idle_cached(),
            evictions: self.pool.evictions(),
        }
    }

    /// Dtype of the stored keys and values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the stored keys and values.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks that this cache was built for a model of configuration `cfg` with `dtype`.
    pub fn check_compatible(&self, cfg: &ModelConfig, dtype: DType) -> Result<(), KvCacheError> {
        let want = Shape {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        if self.shape != want || self.dtype != dtype {
            return Err(KvCacheError::Invalid(format!(
                "cache built for {:?} ({:?}), model has {want:?} ({dtype:?})",
                self.shape, self.dtype
            )));
        }
        Ok(())
    }

    /// Blocks [`KvCache::reserve`] would take to let `seq_id` hold `total_tokens`.
    pub fn blocks_needed(&self, seq_id: u64, total_tokens: usize) -> Result<usize, KvCacheError> {
        let e = self.entry(seq_id)?;
        let grow = total_tokens
            .div_ceil(self.block_tokens)
            .saturating_sub(e.blocks.len());
        Ok(grow + usize::from(self.needs_copy(e, total_tokens)))
    }

    /// Whether writing past `e.len` (up to `total`) lands in a shared block.
    fn needs_copy(&self, e: &SeqEntry, total: usize) -> bool {
        total > e.len
            && !e.len.is_multiple_of(self.block_tokens)
            && e.blocks
                .get(e.len / self.block_tokens)
                .is_some_and(|b| self.pool.refcount(*b) > 1)
    }

    /// Gives `seq_id` blocks for positions up to `total_tokens`, copying a shared block it is
    /// about to write into. Changes nothing when the pool is short ([`KvCacheError::OutOfBlocks`]).
    /// Does not change [`KvCache::len`].
    pub fn reserve(&mut self, seq_id: u64, total_tokens: usize) -> Result<(), KvCacheError> {
        let e = self.entry(seq_id)?;
        if total_tokens > e.max_tokens {
            return Err(KvCacheError::ExceedsReservation {
                seq_id,
                needed: total_tokens,
                reserved: e.max_tokens,
            });
        }
        let needed = self.blocks_needed(seq_id, total_tokens)?;
        if needed > self.pool.available() {
            return Err(KvCacheError::OutOfBlocks {
                needed,
                available: self.pool.available(),
                total: self.pool.num_blocks(),
            });
        }
        if self.needs_copy(self.entry(seq_id)?, total_tokens) {
            self.copy_on_write(seq_id)?;
        }
        let bt = self.block_tokens;
        while self.entry(seq_id)?.blocks.len() * bt < total_tokens {
            let Some(block) = self.pool.alloc() else {
                return Err(KvCacheError::Invalid("pool ran dry after the check".into()));
            };
            self.entry_mut(seq_id)?.blocks.push(block);
        }
        Ok(())
    }

    /// Replaces the shared block at `seq_id`'s length by a private copy.
    fn copy_on_write(&mut self, seq_id: u64) -> Result<(), KvCacheError> {
        let bt = self.block_tokens;
        let idx = self.entry(seq_id)?.len / bt;
        let old = self.entry(seq_id)?.blocks[idx];
        let Some(new) = self.pool.alloc() else {
            return Err(KvCacheError::Invalid("pool ran dry after the check".into()));
        };
        for (k, v) in &self.layers {
            let (from, to) = (old as usize * bt, new as usize * bt);
            k.slice_set(&k.narrow(0, from, bt)?.copy()?, 0, to)?;
            v.slice_set(&v.narrow(0, from, bt)?.copy()?, 0, to)?;
        }
        self.pool.release(old);
        self.entry_mut(seq_id)?.blocks[idx] = new;
        tracing::trace!(seq_id, old, new, "kv block copied on write");
        Ok(())
    }

    /// Slot of position `pos` of a sequence with block table `blocks`.
    pub(crate) fn slot(&self, blocks: &[u32], pos: usize) -> Option<usize> {
        let b = *blocks.get(pos / self.block_tokens)? as usize;
        Some(b * self.block_tokens + pos % self.block_tokens)
    }

    /// Writes keys and values `[n, kv_heads, head_dim]` of `layer` at positions
    /// `start..start + n` (blocks must have been reserved).
    pub fn write(
        &self,
        seq_id: u64,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), KvCacheError> {
        let (bk, bv) = self.layer(layer)?;
        let blocks = &self.entry(seq_id)?.blocks;
        let n = k.dim(0)?;
        if k.dims() != v.dims()
            || k.dims()[1..] != bk.dims()[1..]
            || start + n > blocks.len() * self.block_tokens
        {
            return Err(KvCacheError::Invalid(format!(
                "sequence {seq_id}: write of {:?} at {start} with {} blocks",
                k.dims(),
                blocks.len()
            )));
        }
        let mut done = 0;
        while done < n {
            let pos = start + done;
            let run = (self.block_tokens - pos % self.block_tokens).min(n - done);
            let slot = self
                .slot(blocks, pos)
                .ok_or_else(|| KvCacheError::Invalid(format!("position {pos} unmapped")))?;
            bk.slice_set(&k.narrow(0, done, run)?.contiguous()?, 0, slot)?;
            bv.slice_set(&v.narrow(0, done, run)?.contiguous()?, 0, slot)?;
            done += run;
        }
        Ok(())
    }

    /// Copies keys and values of positions `lo..lo + len` of `seq_id` in `layer` into new
    /// tensors `[kv_heads, len, head_dim]` (the path of devices and dtypes without a paged
    /// attention kernel).
    pub fn gather(
        &self,
        seq_id: u64,
        layer: usize,
        lo: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor), KvCacheError> {
        let (bk, bv) = self.layer(layer)?;
        let blocks = &self.entry(seq_id)?.blocks;
        let slots = (lo..lo + len)
            .map(|p| self.slot(blocks, p).map(|s| s as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                KvCacheError::Invalid(format!("sequence {seq_id}: positions past its blocks"))
            })?;
        let idx = Tensor::from_vec(slots, len, &self.device)?;
        let k = bk.index_select(&idx, 0)?.transpose(0, 1)?.contiguous()?;
        let v = bv.index_select(&idx, 0)?.transpose(0, 1)?.contiguous()?;
        Ok((k, v))
    }

    /// The storage of `layer`: K and V, each `[num_blocks * block_tokens, kv_heads, head_dim]`.
    pub fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor), KvCacheError> {
        self.layers
            .get(layer)
            .map(|(k, v)| (k, v))
            .ok_or_else(|| KvCacheError::Invalid(format!("layer {layer} out of range")))
    }

    /// Commits `tokens`, written at positions `len..len + tokens.len()` of `seq_id`: they
    /// become visible to attention, and blocks they fill are registered in the prefix cache.
    pub fn commit(&mut self, seq_id: u64, tokens: &[u32]) -> Result<(), KvCacheError> {
        let bt = self.block_tokens;
        let e = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))?;
        let len = e.len + tokens.len();
        if len > e.blocks.len() * bt {
            return Err(KvCacheError::Invalid(format!(
                "sequence {seq_id}: length {len} beyond its {} blocks",
                e.blocks.len()
            )));
        }
        e.len = len;
        let Some(p) = &mut e.prefix else {
            return Ok(());
        };
        p.tokens.extend_from_slice(tokens);
        while (p.chain.len() + 1) * bt <= p.tokens.len() {
            let i = p.chain.len();
            let hash = prefix::block_hash(p.chain.last(), &p.identity, &p.tokens[i * bt..][..bt]);
            p.chain.push(hash);
            // A block another sequence computed first stays the cached one; this copy is
            // released with its sequence.
            self.pool.register(e.blocks[i], hash);
        }
        Ok(())
    }

    fn entry(&self, seq_id: u64) -> Result<&SeqEntry, KvCacheError> {
        self.seqs
            .get(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))
    }

    fn entry_mut(&mut self, seq_id: u64) -> Result<&mut SeqEntry, KvCacheError> {
        self.seqs
            .get_mut(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
