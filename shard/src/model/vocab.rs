//! The vocabulary-split embedding lookup and logits of a tensor-parallel rank: each rank holds
//! the embedding and `lm_head` rows of its vocabulary range (`LocalShape::vocab_rows`).
//!
//! * Lookup: a rank gathers the rows of the tokens in its range and zeros for the others; the
//!   sum across ranks is the full embedding, exactly (every value is added to zeros only).
//! * Logits: a rank computes the logits of its range; the all-gather assembles every row's full
//!   vocabulary (each logit is computed whole on one rank).
//!
//! At world size 1 both are the plain operations.

use std::ops::Range;

use candle_core::{DType, Tensor};

use super::embedding::Embedding;
use crate::comm::Comm;

/// Embedding rows of `ids` from this rank's part `embed` (`[range.len(), hidden]`, rows
/// `range` of the vocabulary), summed over the group.
pub(crate) fn lookup(
    embed: &Embedding,
    range: &Range<usize>,
    ids: &[u32],
    comm: &dyn Comm,
) -> candle_core::Result<Tensor> {
    let device = embed.device();
    if comm.world_size() == 1 {
        return embed.rows(ids);
    }
    let inside = |id: u32| range.contains(&(id as usize));
    let local: Vec<u32> = ids
        .iter()
        .map(|&id| {
            if inside(id) {
                id - range.start as u32
            } else {
                0
            }
        })
        .collect();
    let mask: Vec<f32> = ids
        .iter()
        .map(|&id| if inside(id) { 1.0 } else { 0.0 })
        .collect();
    let rows = embed.rows(&local)?;
    let mask = Tensor::from_slice(&mask, (ids.len(), 1), device)?.to_dtype(embed.dtype())?;
    comm.all_reduce_sum_tensor(&rows.broadcast_mul(&mask)?)
}

/// Full f32 logits `[rows, vocab]` from every rank's `[rows, its range]` part (ranges are
/// consecutive chunks of `ceil(vocab / world)`).
pub(crate) fn gather_logits(
    local: &Tensor,
    vocab: usize,
    comm: &dyn Comm,
) -> candle_core::Result<Tensor> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(local.clone());
    }
    let (rows, mine) = local.dims2()?;
    let chunk = vocab.div_ceil(world);
    // Pad this rank's part to a whole chunk so every rank sends the same amount.
    let mut part = vec![0f32; rows * chunk];
    let values = local
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (r, row) in values.chunks_exact(mine.max(1)).take(rows).enumerate() {
        part[r * chunk..r * chunk + mine].copy_from_slice(row);
    }
    let mut all = vec![0f32; world * rows * chunk];
    comm.all_gather(&part, &mut all)?;
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        for rank in 0..world {
            let width = vocab.saturating_sub(rank * chunk).min(chunk);
            let at = (rank * rows + r) * chunk;
            out.extend_from_slice(&all[at..at + width]);
        }
    }
    Tensor::from_vec(out, (rows, vocab), local.device())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::comm::{ShmComm, ShmCommConfig};

    /// Vocabulary 10 over 4 ranks (chunks of 3, the last of 1): every rank's lookup and
    /// gathered logits equal the whole-vocabulary ones.
    #[test]
    fn uneven_vocabulary_split_reassembles_exactly() {
        let (vocab, world, hidden) = (10usize, 4usize, 3usize);
        let table: Vec<f32> = (0..vocab * hidden).map(|i| i as f32 * 0.5 - 7.0).collect();
        let ids = [9u32, 0, 3, 5, 9, 2];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("group");
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (path, table) = (path.clone(), table.clone());
                std::thread::spawn(move || {
                    let comm = ShmComm::join(&ShmCommConfig::new(path, rank, world)).expect("join");
                    let chunk = vocab.div_ceil(world);
                    let range = (rank * chunk).min(vocab)..((rank + 1) * chunk).min(vocab);
                    let part = Tensor::from_slice(
                        &table[range.start * hidden..range.end * hidden],
                        (range.len(), hidden),
                        &Device::Cpu,
                    )
                    .expect("part");
                    let embed = Embedding::Dense(part.clone());
                    let looked = lookup(&embed, &range, &ids, &comm).expect("lookup");
                    // Logits of 2 rows: row r's logit for id v is table[v][r].
                    let local = part.t().and_then(|t| t.narrow(0, 0, 2)).expect("local");
                    let logits = gather_logits(&local, vocab, &comm).expect("gather");
                    (
                        looked.to_vec2::<f32>().expect("rows"),
                        logits.to_vec2::<f32>().expect("logits"),
                    )
                })
            })
            .collect();
        let want_rows: Vec<Vec<f32>> = ids
            .iter()
            .map(|&id| table[id as usize * hidden..(id as usize + 1) * hidden].to_vec())
            .collect();
        let want_logits: Vec<Vec<f32>> = (0..2)
            .map(|r| (0..vocab).map(|v| table[v * hidden + r]).collect())
            .collect();
        for h in handles {
            let (rows, logits) = h.join().expect("rank");
            assert_eq!(rows, want_rows);
            assert_eq!(logits, want_logits);
        }
    }
}
