//! The shards' KV block pool as the batching loop last saw it: each step's `KvStats`, shared
//! with `/metrics` (the gateway's `medley_kv_cache_info`) and turned into the KV gauges.

use std::sync::{Arc, Mutex};

use medley_proto::shard::v1 as pb;

/// The shards' KV block pool after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvBlocks {
    /// Tokens per block.
    pub block_tokens: u32,
    /// Blocks in the pool.
    pub total_blocks: u32,
    /// Blocks held by running sequences.
    pub used_blocks: u32,
    /// Idle blocks kept for their cached prefix (evictable).
    pub cached_blocks: u32,
}

impl KvBlocks {
    /// The pool a step reported; `None` when it reported none (an empty pool means the same).
    pub fn from_stats(stats: Option<&pb::KvStats>) -> Option<Self> {
        stats.filter(|s| s.total_blocks > 0).map(|s| Self {
            block_tokens: s.block_tokens,
            total_blocks: s.total_blocks,
            used_blocks: s.used_blocks,
            cached_blocks: s.cached_blocks,
        })
    }

    /// The share of the pool held by running sequences, 0 to 1.
    pub fn utilization(&self) -> f64 {
        (f64::from(self.used_blocks) / f64::from(self.total_blocks.max(1))).min(1.0)
    }
}

/// The latest [`KvBlocks`], written by the batching loop and read by `/metrics`. Clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct KvView(Arc<Mutex<Option<KvBlocks>>>);

impl KvView {
    /// The pool after the latest step that reported it.
    pub fn get(&self) -> Option<KvBlocks> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps what a step reported (a step that reported nothing changes nothing) and updates
    /// the cached-blocks gauge.
    pub fn observe(&self, stats: Option<&pb::KvStats>) {
        if let Some(kv) = KvBlocks::from_stats(stats) {
            metrics::gauge!(crate::metrics::KV_CACHE_CACHED_BLOCKS)
                .set(f64::from(kv.cached_blocks));
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(kv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_reported_pool() {
        let view = KvView::default();
        assert_eq!(view.get(), None);
        let stats = pb::KvStats {
            block_tokens: 16,
            total_blocks: 8,
            used_blocks: 2,
            cached_blocks: 3,
        };
        view.observe(Some(&stats));
        let kv = view.get().expect("observed");
        assert_eq!((kv.block_tokens, kv.total_blocks), (16, 8));
        assert_eq!(kv.utilization(), 0.25);
        // A step without stats (or with an empty pool) keeps the last ones.
        view.observe(None);
        view.observe(Some(&pb::KvStats::default()));
        assert_eq!(view.get(), Some(kv));
    }
}
