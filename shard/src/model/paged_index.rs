//! The step index the GPU attention kernels read (`kernels/cuda/attention.cu`): where each row's
//! key and value go in the KV pool, which sequence and position each row is, and every
//! sequence's block table. Built on the host once per forward step and uploaded once; every layer
//! reads it.

use crate::kv_cache::KvCache;

use super::ModelError;
use super::batch::BatchPlan;

/// The index of one step, laid out as the kernels read it: `rows` slots, `rows` chunk numbers,
/// `rows` positions, then one block table of `table_stride` entries per chunk (the blocks the
/// chunk's positions use, padded with zeros that are never read). A padding row
/// ([`BatchPlan::padded`]) is a chunk of its own whose table is the pad block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PagedIndex {
    /// The words, in the order above.
    pub words: Vec<u32>,
    /// Rows of the step.
    pub rows: usize,
    /// Entries per block table.
    pub table_stride: usize,
}

impl PagedIndex {
    /// The index of `plan` over `kv`'s block tables (blocks for every row must be reserved).
    pub fn new(plan: &BatchPlan, kv: &KvCache) -> Result<Self, ModelError> {
        Self::with_stride(plan, kv, 1)
    }

    /// [`PagedIndex::new`] with block tables of at least `min_stride` entries (a CUDA graph
    /// replays steps over one index layout while the sequences grow).
    pub fn with_stride(
        plan: &BatchPlan,
        kv: &KvCache,
        min_stride: usize,
    ) -> Result<Self, ModelError> {
        let bt = kv.block_tokens();
        let rows = plan.num_rows();
        let mut tables = Vec::with_capacity(plan.chunks.len());
        for c in &plan.chunks {
            let blocks = kv.blocks(c.seq_id).ok_or_else(|| {
                ModelError::InvalidBatch(format!("sequence {} has no kv cache entry", c.seq_id))
            })?;
            let used = (c.start + c.len).div_ceil(bt);
            if blocks.len() < used {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {}: {} positions but blocks for {}",
                    c.seq_id,
                    c.start + c.len,
                    blocks.len() * bt
                )));
            }
            tables.push(&blocks[..used]);
        }
        let pad_rows = plan.pad_rows();
        let pad = match plan.pad_block {
            Some(block) => [block],
            None if pad_rows == 0 => [0],
            None => {
                return Err(ModelError::InvalidBatch(
                    "padding rows without a pad block".into(),
                ));
            }
        };
        tables.extend(std::iter::repeat_n(&pad[..], pad_rows));
        let table_stride = tables
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(0)
            .max(min_stride)
            .max(1);
        let mut words = Vec::with_capacity(3 * rows + tables.len() * table_stride);
        let pad_slot = kv.slot(&pad, 0).and_then(|s| u32::try_from(s).ok());
        for (c, table) in plan.chunks.iter().zip(&tables) {
            for pos in c.start..c.start + c.len {
                let slot = kv
                    .slot(table, pos)
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or_else(|| {
                        ModelError::InvalidBatch(format!(
                            "sequence {}: position {pos} has no slot",
                            c.seq_id
                        ))
                    })?;
                words.push(slot);
            }
        }
        if pad_rows > 0 {
            let slot = pad_slot.ok_or_else(|| {
                ModelError::InvalidBatch(format!("pad block {} has no slot", pad[0]))
            })?;
            words.extend(std::iter::repeat_n(slot, pad_rows));
        }
        for (i, c) in plan.chunks.iter().enumerate() {
            words.extend(std::iter::repeat_n(i as u32, c.len));
        }
        let chunks = plan.chunks.len() as u32;
        words.extend(chunks..chunks + pad_rows as u32);
        words.extend_from_slice(&plan.positions);
        for table in &tables {
            words.extend_from_slice(table);
            words.extend(std::iter::repeat_n(0, table_stride - table.len()));
        }
        Ok(Self {
            words,
            rows,
            table_stride,
        })
    }
}

#[cfg(any(test, feature = "testing"))]
/// Softmax attention of one query head `q` over `keys`/`values` rows (the visible ones), in f64:
/// the reference of the attention kernels.
pub(crate) fn reference_attention(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    scale: f64,
) -> Vec<f64> {
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(*k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
    (0..q.len())
        .map(|e| {
            s.iter()
                .zip(values)
                .map(|(x, v)| (x - mx).exp() / z * v[e] as f64)
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::kv_cache::KvCacheConfig;
    use crate::model::{ForwardBatch, ModelConfig, SeqChunk};

    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const D: usize = 4;
    const SCALE: f64 = 0.5;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json_str(
            &serde_json::json!({
                "vocab_size": 16, "hidden_size": 16, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
            })
            .to_string(),
        )
        .unwrap()
    }

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(v: Vec<f32>, rows: usize, heads: usize) -> Tensor {
        Tensor::from_vec(v, (rows, heads, D), &Device::Cpu).unwrap()
    }

    /// A decode row of a sequence with 5 cached tokens and a 3-token prefill of a new one, in
    /// 2-token blocks taken alternately: the kernels' reading of the index (emulated here)
    /// writes the same pool as `KvCache::write` and attends to the same keys as
    /// `KvCache::gather` of each sequence.
    #[test]
    fn the_index_addresses_the_same_slots_as_the_cache() {
        let c = cfg();
        let mut kv = KvCache::new(
            &c,
            DType::F32,
            &Device::Cpu,
            KvCacheConfig {
                capacity_tokens: 32,
                block_tokens: 2,
                prefix_caching: false,
            },
        )
        .unwrap();
        kv.allocate(7, 16).unwrap();
        kv.allocate(9, 16).unwrap();
        kv.reserve(9, 2).unwrap();
        kv.reserve(7, 5).unwrap();
        let old_k = tensor(randn(5 * KV_HEADS * D, 1), 5, KV_HEADS);
        let old_v = tensor(randn(5 * KV_HEADS * D, 2), 5, KV_HEADS);
        kv.write(7, 0, 0, &old_k, &old_v).unwrap();
        kv.commit(7, &[1, 2, 3, 4, 5]).unwrap();
        kv.reserve(7, 6).unwrap();
        kv.reserve(9, 3).unwrap();
        let batch = ForwardBatch {
            chunks: vec![
                SeqChunk {
                    seq_id: 7,
                    tokens: vec![6],
                    start_pos: 5,
                    adapter_slot: 0,
                    all_logits: false,
                },
                SeqChunk {
                    seq_id: 9,
                    tokens: vec![1, 2, 3],
                    start_pos: 0,
                    adapter_slot: 0,
                    all_logits: false,
                },
            ],
        };
        let plan = BatchPlan::new(&batch, &kv, 16).unwrap();
        let index = PagedIndex::new(&plan, &kv).unwrap();
        let rows = 4;
        assert_eq!(index.rows, rows);
        assert_eq!(&index.words[rows..3 * rows], &[0, 1, 1, 1, 5, 0, 1, 2]);
        // Wider tables (a CUDA graph's layout): the same rows, each table padded with zeros.
        let wide = PagedIndex::with_stride(&plan, &kv, 5).unwrap();
        assert_eq!((wide.rows, wide.table_stride), (rows, 5));
        assert_eq!(wide.words[..3 * rows], index.words[..3 * rows]);
        for chunk in 0..2 {
            let natural =
                &index.words[3 * rows + chunk * index.table_stride..][..index.table_stride];
            let padded = &wide.words[3 * rows + chunk * 5..][..5];
            assert_eq!(&padded[..natural.len()], natural);
            assert!(padded[natural.len()..].iter().all(|&w| w == 0));
        }
        // A stride below the natural one changes nothing.
        assert_eq!(PagedIndex::with_stride(&plan, &kv, 1).unwrap(), index);
        // Padded to 6 rows (a CUDA graph's size): the step's rows as before; each padding row
        // writes position 0 of the pad block, in a chunk of its own whose table is that block.
        let pad = kv.pad_block().unwrap();
        assert!(PagedIndex::new(&plan.padded(6, pad), &kv).is_ok());
        let mut no_block = plan.padded(6, pad);
        no_block.pad_block = None;
        assert!(PagedIndex::new(&no_block, &kv).is_err());
        let padded = PagedIndex::with_stride(&plan.padded(6, pad), &kv, 5).unwrap();
        assert_eq!((padded.rows, padded.table_stride), (6, 5));
        let w = &padded.words;
        assert_eq!(w[..rows], index.words[..rows]);
        assert_eq!(w[rows..6], [pad * 2, pad * 2]);
        assert_eq!(w[6..12], [0, 1, 1, 1, 2, 3]);
        assert_eq!(w[12..18], [5, 0, 1, 2, 0, 0]);
        assert_eq!(w[18..28], wide.words[3 * rows..]);
        assert_eq!(w[28..], [pad, 0, 0, 0, 0, pad, 0, 0, 0, 0]);
        assert_eq!(plan.padded(4, pad).pad_block, None, "nothing to pad");

        let q = randn(rows * HEADS * D, 3);
        let k_new = randn(rows * KV_HEADS * D, 4);
        let v_new = randn(rows * KV_HEADS * D, 5);
        let width = KV_HEADS * D;

        // The kernels, emulated over the index: write every row at its slot, then attend.
        let (pool_k, pool_v) = kv.layer(0).unwrap();
        let mut pk = pool_k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut pv = pool_v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = &index.words;
        for r in 0..rows {
            let s = w[r] as usize;
            pk[s * width..][..width].copy_from_slice(&k_new[r * width..][..width]);
            pv[s * width..][..width].copy_from_slice(&v_new[r * width..][..width]);
        }
        let mut emulated = Vec::new();
        for r in 0..rows {
            let (chunk, pos) = (w[rows + r] as usize, w[2 * rows + r] as usize);
            let table = &w[3 * rows + chunk * index.table_stride..][..index.table_stride];
            for h in 0..HEADS {
                let kvh = h / (HEADS / KV_HEADS);
                let slots: Vec<usize> = (0..=pos)
                    .map(|j| table[j / 2] as usize * 2 + j % 2)
                    .collect();
                let ks: Vec<&[f32]> = slots
                    .iter()
                    .map(|s| &pk[(s * KV_HEADS + kvh) * D..][..D])
                    .collect();
                let vs: Vec<&[f32]> = slots
                    .iter()
                    .map(|s| &pv[(s * KV_HEADS + kvh) * D..][..D])
                    .collect();
                emulated.extend(reference_attention(
                    &q[(r * HEADS + h) * D..][..D],
                    &ks,
                    &vs,
                    SCALE,
                ));
            }
        }

        // The cache's own write and gather.
        let k_t = tensor(k_new, rows, KV_HEADS);
        let v_t = tensor(v_new, rows, KV_HEADS);
        let mut reference = Vec::new();
        for c in &plan.chunks {
            let k = k_t.narrow(0, c.offset, c.len).unwrap();
            let v = v_t.narrow(0, c.offset, c.len).unwrap();
            kv.write(c.seq_id, 0, c.start, &k, &v).unwrap();
        }
        let (pool_k, pool_v) = kv.layer(0).unwrap();
        assert_eq!(pool_k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), pk);
        assert_eq!(pool_v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), pv);
        for c in &plan.chunks {
            let (keys, values) = kv.gather(c.seq_id, 0, 0, c.start + c.len).unwrap();
            let (keys, values) = (
                keys.to_vec3::<f32>().unwrap(),
                values.to_vec3::<f32>().unwrap(),
            );
            for i in 0..c.len {
                let r = c.offset + i;
                for h in 0..HEADS {
                    let kvh = h / (HEADS / KV_HEADS);
                    let visible = c.start + i + 1;
                    let ks: Vec<&[f32]> = keys[kvh][..visible].iter().map(|k| &k[..]).collect();
                    let vs: Vec<&[f32]> = values[kvh][..visible].iter().map(|v| &v[..]).collect();
                    reference.extend(reference_attention(
                        &q[(r * HEADS + h) * D..][..D],
                        &ks,
                        &vs,
                        SCALE,
                    ));
                }
            }
        }
        assert_eq!(emulated, reference);
    }

    #[test]
    fn rows_without_reserved_blocks_are_refused() {
        let c = cfg();
        let mut kv = KvCache::new(
            &c,
            DType::F32,
            &Device::Cpu,
            KvCacheConfig {
                capacity_tokens: 8,
                block_tokens: 2,
                prefix_caching: false,
            },
        )
        .unwrap();
        kv.allocate(1, 8).unwrap();
        let batch = ForwardBatch {
            chunks: vec![SeqChunk {
                seq_id: 1,
                tokens: vec![1, 2, 3],
                start_pos: 0,
                adapter_slot: 0,
                all_logits: false,
            }],
        };
        let plan = BatchPlan::new(&batch, &kv, 16).unwrap();
        assert!(matches!(
            PagedIndex::new(&plan, &kv),
            Err(ModelError::InvalidBatch(_))
        ));
    }
}
