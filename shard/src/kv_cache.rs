//! Per-sequence key/value storage under a token budget.
//!
//! [`KvCache::allocate`] reserves budget for a sequence's maximum length up front (so admission
//! control can never over-commit), but the device buffers grow lazily: a sequence starts with room
//! for its first chunk rounded up to [`BLOCK_TOKENS`] and grows geometrically (doubling, capped at
//! its reservation), so the total copying is linear in the final length.
//!
//! Layout: for each sequence and layer one K and one V buffer of shape
//! `[num_key_value_heads, capacity, head_dim]` (head-major, so that a prefix `narrow` is a strided
//! batch of contiguous `[len, head_dim]` matrices that CPU gemm and cuBLAS both accept without a
//! copy). The model touches the storage only through [`KvCache::write`] and [`KvCache::view`], so a
//! paged layout (a block table per sequence over a shared block pool) can replace it behind the
//! same interface.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::model::ModelConfig;

/// Granularity, in tokens, of buffer growth (and the block size of a future paged layout).
pub const BLOCK_TOKENS: usize = 64;

/// Errors of the KV cache.
#[derive(Debug, thiserror::Error)]
pub enum KvCacheError {
    /// The reservation does not fit in the remaining budget.
    #[error("kv cache full: {requested} tokens requested, {available} of {capacity} available")]
    OverCapacity {
        /// Tokens asked for.
        requested: usize,
        /// Tokens still unreserved.
        available: usize,
        /// Total budget.
        capacity: usize,
    },
    /// `allocate` was called twice for the same sequence.
    #[error("sequence {0} already has a kv cache entry")]
    DuplicateSequence(u64),
    /// The sequence was never allocated (or already freed).
    #[error("sequence {0} has no kv cache entry")]
    UnknownSequence(u64),
    /// A write would go past the sequence's reservation.
    #[error("sequence {seq_id}: {needed} tokens exceed its reservation of {reserved}")]
    ExceedsReservation {
        /// Sequence.
        seq_id: u64,
        /// Tokens the sequence would hold.
        needed: usize,
        /// Tokens reserved at `allocate`.
        reserved: usize,
    },
    /// A layer index or a tensor shape does not match the cache.
    #[error("kv cache misuse: {0}")]
    Invalid(String),
    /// Tensor operation failure.
    #[error("kv cache tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// One sequence's reservation and buffers.
struct SeqEntry {
    /// Tokens reserved at `allocate`.
    max_tokens: usize,
    /// Tokens committed (visible to attention).
    len: usize,
    /// Tokens the buffers can hold.
    capacity: usize,
    /// Per layer `(k, v)`, each `[kv_heads, capacity, head_dim]`; empty until the first grow.
    layers: Vec<(Tensor, Tensor)>,
}

/// Per-sequence, per-layer K and V storage with a token budget.
pub struct KvCache {
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    capacity_tokens: usize,
    reserved_tokens: usize,
    seqs: HashMap<u64, SeqEntry>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layers", &self.num_layers)
            .field("dtype", &self.dtype)
            .field("capacity_tokens", &self.capacity_tokens)
            .field("reserved_tokens", &self.reserved_tokens)
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl KvCache {
    /// An empty cache for a model with configuration `cfg`, storing K/V in `dtype` on `device`,
    /// with a budget of `capacity_tokens` tokens over all sequences.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device, capacity_tokens: usize) -> Self {
        Self {
            num_layers: cfg.num_hidden_layers,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            dtype,
            device: device.clone(),
            capacity_tokens,
            reserved_tokens: 0,
            seqs: HashMap::new(),
        }
    }

    /// Bytes of K and V one token occupies over all layers.
    pub fn bytes_per_token(cfg: &ModelConfig, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes()
    }

    /// Reserves budget for a sequence of up to `max_tokens` tokens (prompt plus generation).
    pub fn allocate(&mut self, seq_id: u64, max_tokens: usize) -> Result<(), KvCacheError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(KvCacheError::DuplicateSequence(seq_id));
        }
        let available = self.available_tokens();
        if max_tokens > available {
            return Err(KvCacheError::OverCapacity {
                requested: max_tokens,
                available,
                capacity: self.capacity_tokens,
            });
        }
        self.reserved_tokens += max_tokens;
        self.seqs.insert(
            seq_id,
            SeqEntry {
                max_tokens,
                len: 0,
                capacity: 0,
                layers: vec![],
            },
        );
        Ok(())
    }

    /// Releases a sequence's reservation and buffers (no-op for an unknown id).
    pub fn free(&mut self, seq_id: u64) {
        if let Some(e) = self.seqs.remove(&seq_id) {
            self.reserved_tokens -= e.max_tokens;
        }
    }

    /// Tokens stored for `seq_id`, or `None` when it is not allocated.
    pub fn len(&self, seq_id: u64) -> Option<usize> {
        self.seqs.get(&seq_id).map(|e| e.len)
    }

    /// Tokens reserved for `seq_id` at `allocate`.
    pub fn max_tokens(&self, seq_id: u64) -> Option<usize> {
        self.seqs.get(&seq_id).map(|e| e.max_tokens)
    }

    /// Tokens reserved by all sequences.
    pub fn reserved_tokens(&self) -> usize {
        self.reserved_tokens
    }

    /// The token budget.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }

    /// Budget not yet reserved.
    pub fn available_tokens(&self) -> usize {
        self.capacity_tokens.saturating_sub(self.reserved_tokens)
    }

    /// Number of allocated sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Tokens the device buffers of `seq_id` can currently hold (grows lazily up to the
    /// reservation).
    pub fn buffer_tokens(&self, seq_id: u64) -> Option<usize> {
        self.seqs.get(&seq_id).map(|e| e.capacity)
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
        if self.num_layers != cfg.num_hidden_layers
            || self.num_kv_heads != cfg.num_key_value_heads
            || self.head_dim != cfg.head_dim
            || self.dtype != dtype
        {
            return Err(KvCacheError::Invalid(format!(
                "cache built for {} layers x {} kv heads x {} ({:?}), model has {} x {} x {} ({dtype:?})",
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
                cfg.num_hidden_layers,
                cfg.num_key_value_heads,
                cfg.head_dim
            )));
        }
        Ok(())
    }

    /// Makes the buffers of `seq_id` large enough for `total_tokens` tokens (within its
    /// reservation). Does not change [`KvCache::len`].
    pub fn reserve_buffers(
        &mut self,
        seq_id: u64,
        total_tokens: usize,
    ) -> Result<(), KvCacheError> {
        let (kv_heads, head_dim, dtype, layers) = (
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.num_layers,
        );
        let device = self.device.clone();
        let e = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))?;
        if total_tokens > e.max_tokens {
            return Err(KvCacheError::ExceedsReservation {
                seq_id,
                needed: total_tokens,
                reserved: e.max_tokens,
            });
        }
        if total_tokens <= e.capacity {
            return Ok(());
        }
        let new_cap = total_tokens
            .div_ceil(BLOCK_TOKENS)
            .saturating_mul(BLOCK_TOKENS)
            .max(e.capacity.saturating_mul(2))
            .min(e.max_tokens);
        let mut grown = Vec::with_capacity(layers);
        for l in 0..layers {
            let k = Tensor::zeros((kv_heads, new_cap, head_dim), dtype, &device)?;
            let v = Tensor::zeros((kv_heads, new_cap, head_dim), dtype, &device)?;
            if let Some((old_k, old_v)) = e.layers.get(l) {
                k.slice_set(old_k, 1, 0)?;
                v.slice_set(old_v, 1, 0)?;
            }
            grown.push((k, v));
        }
        tracing::trace!(seq_id, from = e.capacity, to = new_cap, "kv buffers grown");
        e.layers = grown;
        e.capacity = new_cap;
        Ok(())
    }

    /// Writes keys and values `[kv_heads, n, head_dim]` of `layer` at token offset `start`.
    /// [`KvCache::reserve_buffers`] must have made room for `start + n` tokens.
    pub fn write(
        &self,
        seq_id: u64,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), KvCacheError> {
        let (bk, bv) = self.buffers(seq_id, layer)?;
        let n = k.dim(1)?;
        if start + n > bk.dim(1)? || k.dims() != v.dims() {
            return Err(KvCacheError::Invalid(format!(
                "write of {:?} at {start} into a buffer of {:?}",
                k.dims(),
                bk.dims()
            )));
        }
        bk.slice_set(&k.contiguous()?, 1, start)?;
        bv.slice_set(&v.contiguous()?, 1, start)?;
        Ok(())
    }

    /// Views `[kv_heads, len, head_dim]` of keys and values of tokens `start..start + len` of
    /// `layer` (including tokens written but not yet committed).
    pub fn view(
        &self,
        seq_id: u64,
        layer: usize,
        start: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor), KvCacheError> {
        let (bk, bv) = self.buffers(seq_id, layer)?;
        Ok((bk.narrow(1, start, len)?, bv.narrow(1, start, len)?))
    }

    /// Sets the number of committed tokens of `seq_id` (after a forward step wrote them, or to
    /// roll back to a shorter prefix).
    pub fn set_len(&mut self, seq_id: u64, len: usize) -> Result<(), KvCacheError> {
        let e = self
            .seqs
            .get_mut(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))?;
        if len > e.capacity {
            return Err(KvCacheError::Invalid(format!(
                "sequence {seq_id}: length {len} beyond its buffers ({})",
                e.capacity
            )));
        }
        e.len = len;
        Ok(())
    }

    fn buffers(&self, seq_id: u64, layer: usize) -> Result<&(Tensor, Tensor), KvCacheError> {
        let e = self
            .seqs
            .get(&seq_id)
            .ok_or(KvCacheError::UnknownSequence(seq_id))?;
        e.layers.get(layer).ok_or_else(|| {
            KvCacheError::Invalid(format!(
                "sequence {seq_id}: layer {layer} has no buffers (capacity {})",
                e.capacity
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json_str(
            &serde_json::json!({
                "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn budget_accounting() {
        let c = cfg();
        assert_eq!(KvCache::bytes_per_token(&c, DType::F32), 2 * 2 * 4 * 4);
        let mut kv = KvCache::new(&c, DType::F32, &Device::Cpu, 100);
        kv.allocate(1, 60).unwrap();
        assert!(matches!(
            kv.allocate(1, 1),
            Err(KvCacheError::DuplicateSequence(1))
        ));
        assert!(matches!(
            kv.allocate(2, 41),
            Err(KvCacheError::OverCapacity { available: 40, .. })
        ));
        kv.allocate(2, 40).unwrap();
        assert_eq!((kv.reserved_tokens(), kv.num_sequences()), (100, 2));
        kv.free(1);
        kv.free(1);
        assert_eq!((kv.reserved_tokens(), kv.available_tokens()), (40, 60));
        assert_eq!(kv.len(1), None);
        assert_eq!(kv.len(2), Some(0));
        assert_eq!(
            kv.buffer_tokens(2),
            Some(0),
            "no memory before the first write"
        );
    }

    #[test]
    fn lazy_growth_keeps_contents() {
        let c = cfg();
        let mut kv = KvCache::new(&c, DType::F32, &Device::Cpu, 10_000);
        kv.allocate(7, 1000).unwrap();
        kv.reserve_buffers(7, 3).unwrap();
        assert_eq!(kv.buffer_tokens(7), Some(BLOCK_TOKENS));
        let k = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 4))
            .unwrap();
        let v = (&k + 100.0).unwrap();
        kv.write(7, 1, 0, &k, &v).unwrap();
        kv.set_len(7, 3).unwrap();
        kv.reserve_buffers(7, 65).unwrap();
        assert_eq!(kv.buffer_tokens(7), Some(128));
        kv.reserve_buffers(7, 900).unwrap();
        assert_eq!(kv.buffer_tokens(7), Some(960));
        kv.reserve_buffers(7, 1000).unwrap();
        assert_eq!(kv.buffer_tokens(7), Some(1000), "capped at the reservation");
        let (gk, gv) = kv.view(7, 1, 0, 3).unwrap();
        assert_eq!(gk.to_vec3::<f32>().unwrap(), k.to_vec3::<f32>().unwrap());
        assert_eq!(gv.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        assert!(matches!(
            kv.reserve_buffers(7, 1001),
            Err(KvCacheError::ExceedsReservation { .. })
        ));
        assert!(kv.write(7, 2, 0, &k, &v).is_err(), "layer out of range");
        assert!(kv.write(7, 0, 998, &k, &v).is_err(), "past the buffer");
        assert!(matches!(
            kv.reserve_buffers(9, 1),
            Err(KvCacheError::UnknownSequence(9))
        ));
    }
}
