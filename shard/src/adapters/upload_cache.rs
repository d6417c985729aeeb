//! A bounded map from the content of a small host table to its device copy, so a table that
//! repeats is uploaded once: the CUDA LoRA op's factor-pointer tables (one per layer and
//! projection, the same from step to step while the batch keeps its adapters) and its row
//! mappings (one per step, shared by every projection of the step).
//!
//! Keyed by content, a cached copy always holds exactly what the caller would upload now, so a
//! hit is correct whatever happened in between (an adapter evicted and another loaded at the
//! same address included). When full the cache is emptied: tables are small and rebuilt on the
//! next miss, and the bound only keeps a long-running server from collecting stale ones.
//!
//! A step looks tables up a few hundred times, so a lookup is cheap: the key last asked for is
//! compared first (a step's projections share its row mapping), then a map with a fast
//! non-cryptographic hash (the keys are the server's own tables, and the map is bounded).

use std::hash::Hash;

use rustc_hash::FxHashMap;

/// Device copies of host tables, keyed by `K` (the device and the table's content).
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct UploadCache<K, V> {
    entries: FxHashMap<K, V>,
    /// The key last asked for and its copy.
    last: Option<(K, V)>,
    capacity: usize,
    uploads: u64,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<K: Hash + Eq + Clone, V: Clone> UploadCache<K, V> {
    /// An empty cache of at most `capacity` (at least 1) tables.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: FxHashMap::default(),
            last: None,
            capacity: capacity.max(1),
            uploads: 0,
        }
    }

    /// The copy cached under `key`, or the one `upload` makes (then cached). An upload error is
    /// returned and nothing is cached.
    pub fn get_or_upload<E>(
        &mut self,
        key: K,
        upload: impl FnOnce(&K) -> Result<V, E>,
    ) -> Result<V, E> {
        if let Some((last, v)) = &self.last
            && *last == key
        {
            return Ok(v.clone());
        }
        let v = match self.entries.get(&key) {
            Some(v) => v.clone(),
            None => {
                let v = upload(&key)?;
                self.uploads += 1;
                if self.entries.len() >= self.capacity {
                    self.entries.clear();
                }
                self.entries.insert(key.clone(), v.clone());
                v
            }
        };
        self.last = Some((key, v.clone()));
        Ok(v)
    }

    /// Tables uploaded so far (misses).
    pub fn uploads(&self) -> u64 {
        self.uploads
    }

    /// Tables held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// `u32` words packed two to a `u64` (little-endian: word `2i` in the low half), the last
/// half zero when `words` is odd: how the tables travel to the GPU, whose kernels read them
/// back as `u32`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn pack_words(words: impl IntoIterator<Item = u32>) -> Vec<u64> {
    let mut words = words.into_iter();
    let mut out = Vec::with_capacity(words.size_hint().0.div_ceil(2));
    while let Some(lo) = words.next() {
        let hi = words.next().unwrap_or(0);
        out.push(lo as u64 | (hi as u64) << 32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_table_is_uploaded_once() {
        let mut cache = UploadCache::new(4);
        let up = |k: &(u8, Vec<u64>)| Ok::<_, ()>(k.1.iter().sum::<u64>());
        assert_eq!(cache.get_or_upload((0, vec![1, 2]), up), Ok(3));
        assert_eq!(cache.get_or_upload((0, vec![1, 2]), up), Ok(3));
        assert_eq!(cache.uploads(), 1);
        // Another device or another content is another table.
        assert_eq!(cache.get_or_upload((1, vec![1, 2]), up), Ok(3));
        assert_eq!(cache.get_or_upload((0, vec![2, 1]), up), Ok(3));
        assert_eq!(cache.uploads(), 3);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn a_failed_upload_caches_nothing() {
        let mut cache: UploadCache<Vec<u64>, u64> = UploadCache::new(4);
        assert_eq!(
            cache.get_or_upload(vec![7], |_| Err("no memory")),
            Err("no memory")
        );
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.get_or_upload(vec![7], |_| Ok::<_, &str>(7)), Ok(7));
        assert_eq!(cache.uploads(), 1);
    }

    #[test]
    fn the_last_table_is_served_again_and_others_from_the_map() {
        let mut cache = UploadCache::new(4);
        let up = |k: &u32| Ok::<_, ()>(*k * 10);
        for k in [1, 1, 2, 1, 2, 2] {
            assert_eq!(cache.get_or_upload(k, up), Ok(k * 10));
        }
        assert_eq!(cache.uploads(), 2);
        // Emptied when full: the last table is still the one asked for.
        let mut small = UploadCache::new(1);
        assert_eq!(small.get_or_upload(1, up), Ok(10));
        assert_eq!(small.get_or_upload(2, up), Ok(20));
        assert_eq!(small.get_or_upload(1, |_| Err(())), Err(()));
        assert_eq!(small.get_or_upload(2, up), Ok(20));
    }

    #[test]
    fn a_full_cache_empties_and_keeps_the_new_table() {
        let mut cache = UploadCache::new(2);
        let up = |k: &u32| Ok::<_, ()>(*k * 10);
        for k in [1, 2, 3] {
            assert_eq!(cache.get_or_upload(k, up), Ok(k * 10));
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get_or_upload(3, |_| Err(())), Ok(30));
        assert_eq!(cache.uploads(), 3);
        assert_eq!(UploadCache::<u32, u32>::new(0).capacity, 1);
    }

    #[test]
    fn words_pack_two_to_a_u64_little_end_first() {
        assert_eq!(pack_words([]), Vec::<u64>::new());
        assert_eq!(pack_words([1]), [1]);
        assert_eq!(pack_words([1, 2, 3]), [1 | 2 << 32, 3]);
        assert_eq!(pack_words([u32::MAX, 0]), [u32::MAX as u64]);
    }
}
