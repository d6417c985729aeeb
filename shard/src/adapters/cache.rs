//! A byte-bounded LRU of parsed, shape-checked source adapters, so repeated merges of the same
//! components do not read and decode their files again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use medley_merge::LoraAdapter;

use super::source::SourceKey;

struct Entry {
    adapter: Arc<LoraAdapter>,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<SourceKey, Entry>,
    used: u64,
    clock: u64,
}

/// Parsed adapters by the identity of their files, at most `capacity` bytes (f32 factor bytes).
pub struct SourceCache {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SourceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, used) = self.stats();
        f.debug_struct("SourceCache")
            .field("capacity", &self.capacity)
            .field("entries", &entries)
            .field("used", &used)
            .finish()
    }
}

impl SourceCache {
    /// An empty cache holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The cached adapter for `key`, or the result of `load` (cached when it fits). Returns the
    /// adapter and whether it came from the cache. `load` runs without the lock held, so two
    /// first requests for the same files may both read them.
    pub fn get_or_load<E>(
        &self,
        key: &SourceKey,
        load: impl FnOnce() -> Result<LoraAdapter, E>,
    ) -> Result<(Arc<LoraAdapter>, bool), E> {
        if let Some(hit) = self.get(key) {
            return Ok((hit, true));
        }
        let adapter = Arc::new(load()?);
        self.insert(key.clone(), adapter.clone());
        Ok((adapter, false))
    }

    fn get(&self, key: &SourceKey) -> Option<Arc<LoraAdapter>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let entry = inner.entries.get_mut(key)?;
        entry.last_used = now;
        Some(entry.adapter.clone())
    }

    fn insert(&self, key: SourceKey, adapter: Arc<LoraAdapter>) {
        let bytes = adapter.byte_size() as u64;
        if bytes > self.capacity {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some(old) = inner.entries.remove(&key) {
            inner.used -= old.bytes;
        }
        while inner.used + bytes > self.capacity {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.used -= e.bytes;
            }
        }
        inner.used += bytes;
        inner.entries.insert(
            key,
            Entry {
                adapter,
                bytes,
                last_used: now,
            },
        );
    }

    /// Number of cached adapters and their bytes.
    pub fn stats(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.entries.len(), inner.used)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // few field writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::adapters::source::AdapterSources;
    use medley_hub::HubSettings;
    use medley_merge::fixture::{AdapterFixture, LlamaShape};

    /// Keys of three distinct adapter directories written into `root`.
    fn keys(root: &Path) -> Vec<SourceKey> {
        let shapes = LlamaShape::tiny().module_shapes();
        let sources = AdapterSources::new(
            &[root.to_path_buf()],
            HubSettings::from_vars(None, |_| None),
        )
        .expect("root");
        (0..3)
            .map(|i| {
                AdapterFixture::new(2, i)
                    .write(&root.join(format!("a{i}")), &shapes)
                    .expect("write");
                sources
                    .resolve_local(&format!("a{i}"))
                    .expect("resolve")
                    .key
            })
            .collect()
    }

    fn adapter(seed: u64) -> LoraAdapter {
        let mut fx = AdapterFixture::new(2, seed);
        fx.targets = vec!["q_proj".into()];
        fx.adapter(&LlamaShape::tiny().module_shapes())
            .expect("fixture")
    }

    #[test]
    fn hits_and_lru_eviction_by_bytes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let keys = keys(tmp.path());
        let one = adapter(0).byte_size() as u64;
        let cache = SourceCache::new(2 * one);
        let load = |seed| move || Ok::<_, ()>(adapter(seed));
        let (a0, hit) = cache.get_or_load(&keys[0], load(0)).expect("load");
        assert!(!hit);
        let (again, hit) = cache
            .get_or_load(&keys[0], || Err::<LoraAdapter, ()>(()))
            .expect("cached");
        assert!(hit && Arc::ptr_eq(&a0, &again));
        cache.get_or_load(&keys[1], load(1)).expect("load");
        // Touch 0 so 1 is the least recently used, then a third adapter evicts 1.
        cache.get_or_load(&keys[0], load(0)).expect("hit");
        cache.get_or_load(&keys[2], load(2)).expect("load");
        assert_eq!(cache.stats(), (2, 2 * one));
        assert!(cache.get_or_load(&keys[0], load(0)).expect("hit").1);
        assert!(!cache.get_or_load(&keys[1], load(1)).expect("reloaded").1);
        // Errors are returned and not cached; an adapter larger than the cache is not kept.
        let small = SourceCache::new(one - 1);
        assert_eq!(
            small.get_or_load(&keys[0], || Err::<LoraAdapter, i32>(7)),
            Err(7)
        );
        assert!(!small.get_or_load(&keys[0], load(0)).expect("load").1);
        assert_eq!(small.stats(), (0, 0));
    }
}
