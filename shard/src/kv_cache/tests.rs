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

fn cache(tokens: usize, block: usize, prefix: bool) -> KvCache {
    KvCache::new(
        &cfg(),
        DType::F32,
        &Device::Cpu,
        KvCacheConfig {
            capacity_tokens: tokens,
            block_tokens: block,
            prefix_caching: prefix,
        },
    )
    .unwrap()
}

/// Keys `[n, 1, 4]` whose values encode (seed, position).
fn rows(seed: f32, start: usize, n: usize) -> Tensor {
    let v: Vec<f32> = (start..start + n)
        .flat_map(|p| (0..4).map(move |x| seed * 1000.0 + p as f32 * 10.0 + x as f32))
        .collect();
    Tensor::from_vec(v, (n, 1, 4), &Device::Cpu).unwrap()
}

/// Reserves, writes (layer 1) and commits `tokens` at the end of `seq`.
fn append(kv: &mut KvCache, seq: u64, seed: f32, tokens: &[u32]) {
    let start = kv.len(seq).unwrap();
    kv.reserve(seq, start + tokens.len()).unwrap();
    let k = rows(seed, start, tokens.len());
    for layer in 0..2 {
        kv.write(seq, layer, start, &k, &(&k + 0.5).unwrap())
            .unwrap();
    }
    kv.commit(seq, tokens).unwrap();
}

fn keys(kv: &KvCache, seq: u64) -> Vec<Vec<f32>> {
    let len = kv.len(seq).unwrap();
    kv.gather(seq, 1, 0, len)
        .unwrap()
        .0
        .to_vec3::<f32>()
        .unwrap()[0]
        .clone()
}

#[test]
fn blocks_are_taken_as_tokens_are_written() {
    let mut kv = cache(64, 4, false);
    assert_eq!(kv.capacity_tokens(), 64);
    kv.allocate(1, 100).unwrap();
    assert!(matches!(
        kv.allocate(1, 1),
        Err(KvCacheError::DuplicateSequence(1))
    ));
    assert_eq!(
        kv.stats().used_blocks,
        0,
        "no memory before the first write"
    );
    append(&mut kv, 1, 1.0, &[0; 3]);
    assert_eq!(kv.blocks(1).unwrap().len(), 1);
    append(&mut kv, 1, 1.0, &[0; 6]);
    assert_eq!((kv.len(1), kv.blocks(1).unwrap().len()), (Some(9), 3));
    let got = keys(&kv, 1);
    assert_eq!(
        got,
        rows(1.0, 0, 9)
            .to_vec3::<f32>()
            .unwrap()
            .iter()
            .map(|r| r[0].clone())
            .collect::<Vec<_>>()
    );
    let (_, v) = kv.gather(1, 0, 2, 5).unwrap();
    assert_eq!(v.dims(), &[1, 5, 4]);
    assert_eq!(v.to_vec3::<f32>().unwrap()[0][0][0], 1000.0 + 20.0 + 0.5);
    kv.free(1);
    kv.free(1);
    assert_eq!((kv.stats().used_blocks, kv.num_sequences()), (0, 0));
}

#[test]
fn a_short_pool_refuses_without_changing_anything() {
    let mut kv = cache(8, 4, false);
    kv.allocate(1, 100).unwrap();
    kv.allocate(2, 100).unwrap();
    append(&mut kv, 1, 1.0, &[0; 5]);
    assert!(matches!(
        kv.reserve(2, 4),
        Err(KvCacheError::OutOfBlocks {
            needed: 1,
            available: 0,
            total: 2
        })
    ));
    assert_eq!(kv.blocks(2).unwrap().len(), 0);
    assert!(matches!(
        kv.reserve(1, 101),
        Err(KvCacheError::ExceedsReservation { .. })
    ));
    kv.free(1);
    kv.reserve(2, 8).unwrap();
    assert!(
        kv.write(2, 0, 7, &rows(0.0, 0, 2), &rows(0.0, 0, 2))
            .is_err(),
        "past the blocks"
    );
    assert!(
        kv.write(2, 2, 0, &rows(0.0, 0, 1), &rows(0.0, 0, 1))
            .is_err(),
        "no layer 2"
    );
    assert!(matches!(
        kv.reserve(9, 1),
        Err(KvCacheError::UnknownSequence(9))
    ));
}

/// Mixed lengths hold at most one partly filled block each beyond their tokens.
#[test]
fn sequences_hold_one_partial_block_at_most() {
    let mut kv = cache(64 * 100, 16, false);
    let mut tokens = 0;
    for s in 0..64u64 {
        let n = 1 + (s as usize * 37) % 90;
        kv.allocate(s, n).unwrap();
        append(&mut kv, s, 0.0, &vec![1; n]);
        tokens += n;
        assert_eq!(kv.blocks(s).unwrap().len(), n.div_ceil(16));
    }
    let used = kv.stats().used_blocks * 16;
    assert!(
        used >= tokens && used - tokens < 64 * 16,
        "{used} slots for {tokens} tokens"
    );
}

#[test]
fn prefix_blocks_are_reused_under_the_same_adapter_only() {
    let mut kv = cache(256, 4, true);
    let a = AdapterIdentity::of_adapter("a");
    let prompt: Vec<u32> = (0..10).collect();
    assert_eq!(kv.allocate_cached(1, 64, a, &prompt).unwrap(), 0);
    append(&mut kv, 1, 1.0, &prompt);
    let written = keys(&kv, 1);
    // Same prompt, same adapter: the two full blocks of the first 9 tokens come back.
    assert_eq!(kv.allocate_cached(2, 64, a, &prompt).unwrap(), 8);
    assert_eq!(kv.blocks(2).unwrap()[..2], kv.blocks(1).unwrap()[..2]);
    assert_eq!(keys(&kv, 2), written[..8]);
    // Another adapter, or the base model: nothing shared.
    let b = AdapterIdentity::of_adapter("b");
    assert_eq!(kv.allocate_cached(3, 64, b, &prompt).unwrap(), 0);
    assert_eq!(
        kv.allocate_cached(4, 64, AdapterIdentity::BASE, &prompt)
            .unwrap(),
        0
    );
    // A prompt that differs in its second block shares the first only.
    let mut other = prompt.clone();
    other[5] = 99;
    assert_eq!(kv.allocate_cached(5, 64, a, &other).unwrap(), 4);
    // The cache outlives its writer.
    kv.free(1);
    kv.free(2);
    assert_eq!(kv.allocate_cached(6, 64, a, &prompt).unwrap(), 8);
    assert_eq!(keys(&kv, 6), written[..8]);
    // Off: nothing is looked up.
    let mut off = cache(256, 4, false);
    off.allocate_cached(1, 64, a, &prompt).unwrap();
    append(&mut off, 1, 1.0, &prompt);
    assert_eq!(off.allocate_cached(2, 64, a, &prompt).unwrap(), 0);
}

#[test]
fn idle_cached_blocks_are_evicted_least_recently_released_first() {
    let mut kv = cache(16, 4, true);
    let a = AdapterIdentity::BASE;
    for (seq, first) in [(1u64, 0u32), (2, 100)] {
        let p: Vec<u32> = (first..first + 8).collect();
        kv.allocate_cached(seq, 64, a, &p).unwrap();
        append(&mut kv, seq, seq as f32, &p);
    }
    kv.free(1);
    kv.free(2);
    assert_eq!(kv.stats().cached_blocks, 4);
    // Two new blocks evict sequence 1's (released first), tail before head.
    kv.allocate(3, 64).unwrap();
    kv.reserve(3, 8).unwrap();
    assert_eq!(kv.stats().evictions, 2);
    let p1: Vec<u32> = (0..9).collect();
    let p2: Vec<u32> = (100..109).collect();
    assert_eq!(kv.allocate_cached(4, 64, a, &p1).unwrap(), 0);
    assert_eq!(kv.allocate_cached(5, 64, a, &p2).unwrap(), 8);
}

#[test]
fn a_shared_partial_block_is_copied_on_write() {
    let mut kv = cache(64, 4, false);
    kv.allocate(1, 64).unwrap();
    append(&mut kv, 1, 1.0, &[0; 6]);
    kv.fork(1, 2).unwrap();
    assert_eq!(kv.blocks(1), kv.blocks(2));
    assert_eq!(kv.blocks_needed(2, 7).unwrap(), 1, "one copy");
    append(&mut kv, 2, 2.0, &[0; 3]);
    let (b1, b2) = (kv.blocks(1).unwrap(), kv.blocks(2).unwrap());
    assert_eq!(b1[0], b2[0], "the full block stays shared");
    assert_ne!(b1[1], b2[1], "the partial one was copied");
    let (k1, k2) = (keys(&kv, 1), keys(&kv, 2));
    assert_eq!(
        k1,
        rows(1.0, 0, 6)
            .to_vec3::<f32>()
            .unwrap()
            .iter()
            .map(|r| r[0].clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(k2[..6], k1[..]);
    assert_eq!(k2[6][0], 2000.0 + 60.0);
    kv.free(1);
    kv.free(2);
    assert_eq!(kv.stats().used_blocks, 0);
}

/// The pad block is a free block, kept until released, never a cached one.
#[test]
fn the_pad_block_takes_a_free_block_only() {
    let mut kv = cache(16, 4, true);
    let a = AdapterIdentity::BASE;
    let p: Vec<u32> = (0..12).collect();
    kv.allocate_cached(1, 64, a, &p).unwrap();
    append(&mut kv, 1, 1.0, &p);
    let pad = kv.pad_block().expect("one block is free");
    assert!(!kv.blocks(1).unwrap().contains(&pad));
    assert_eq!(kv.pad_block(), Some(pad), "kept");
    assert_eq!((kv.available_blocks(), kv.stats().used_blocks), (0, 4));
    assert!(kv.release_pad_block() && !kv.release_pad_block());
    assert_eq!(kv.available_blocks(), 1);
    // Sequence 1's blocks are cached once it is freed: none is free, so no pad block.
    kv.free(1);
    kv.allocate(2, 64).unwrap();
    kv.reserve(2, 4).unwrap();
    assert_eq!(kv.pad_block(), None);
    assert_eq!(kv.stats().evictions, 0);
}
