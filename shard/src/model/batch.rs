//! The ragged batch of one forward step and its validation against the KV cache.

use std::collections::HashSet;

use crate::kv_cache::KvCache;

use super::lora::RowSlots;

use super::ModelError;

/// New tokens of one sequence in a forward step: a prefill chunk or a single decode token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Sequence (KV cache entry) the tokens belong to.
    pub seq_id: u64,
    /// Token ids to append (at least one).
    pub tokens: Vec<u32>,
    /// Position of the first token; must equal `kv.len(seq_id)`.
    pub start_pos: usize,
    /// Adapter slot applied to these rows (0 = base model).
    pub adapter_slot: u32,
    /// Return logits for every token of the chunk instead of only the last one.
    pub all_logits: bool,
}

/// One forward step over several sequences; prefill chunks and decode steps may be mixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// The chunks, in the order their logits rows are returned.
    pub chunks: Vec<SeqChunk>,
}

impl ForwardBatch {
    /// Total number of new tokens.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }

    /// Number of logits rows [`crate::model::LlamaModel::forward`] returns for this batch.
    pub fn num_logit_rows(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| if c.all_logits { c.tokens.len() } else { 1 })
            .sum()
    }
}

/// The size a decode step of `rows` rows is padded to for a CUDA graph: 1, 2 and 4, then the
/// next multiple of 8 (vLLM's sizes): a graph serves a batch while requests join and leave,
/// and a step computes at most 7 rows more than it needs.
#[cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "CUDA graphs use it; tests elsewhere")
)]
pub(crate) fn graph_rows(rows: usize) -> usize {
    match rows {
        0..=2 => rows,
        3..=4 => 4,
        _ => rows.next_multiple_of(8),
    }
}

/// Where one chunk's rows sit in the flattened batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    pub seq_id: u64,
    /// First row of the chunk in the flattened batch.
    pub offset: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token.
    pub start: usize,
}

/// The flattened, validated batch: one row per new token.
#[derive(Debug, Clone)]
pub(crate) struct BatchPlan {
    pub chunks: Vec<ChunkPlan>,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub row_slots: RowSlots,
    /// Rows whose logits are returned, in output order.
    pub logit_rows: Vec<u32>,
    /// The KV block the padding rows write into ([`BatchPlan::padded`]).
    pub pad_block: Option<u32>,
}

impl BatchPlan {
    /// Flattens `batch`, checking it against the cache and the vocabulary without mutating
    /// anything.
    pub fn new(batch: &ForwardBatch, kv: &KvCache, vocab_size: usize) -> Result<Self, ModelError> {
        let bad = |msg: String| Err(ModelError::InvalidBatch(msg));
        if batch.chunks.is_empty() {
            return bad("empty batch".into());
        }
        let total = batch.num_tokens();
        if u32::try_from(total).is_err() {
            return bad(format!("{total} tokens in one batch"));
        }
        let mut seen = HashSet::new();
        let mut row_slots = Vec::with_capacity(total);
        let mut plan = Self {
            chunks: Vec::with_capacity(batch.chunks.len()),
            tokens: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            row_slots: RowSlots::default(),
            logit_rows: Vec::with_capacity(batch.num_logit_rows()),
            pad_block: None,
        };
        for c in &batch.chunks {
            let n = c.tokens.len();
            if n == 0 {
                return bad(format!("sequence {}: empty chunk", c.seq_id));
            }
            if !seen.insert(c.seq_id) {
                return bad(format!("sequence {} appears twice in the batch", c.seq_id));
            }
            match kv.len(c.seq_id) {
                None => return bad(format!("sequence {} has no kv cache entry", c.seq_id)),
                Some(len) if len != c.start_pos => {
                    return bad(format!(
                        "sequence {}: start_pos {} but {len} tokens cached",
                        c.seq_id, c.start_pos
                    ));
                }
                Some(_) => {}
            }
            let end = c.start_pos + n;
            if u32::try_from(end).is_err() {
                return bad(format!(
                    "sequence {}: position {end} out of range",
                    c.seq_id
                ));
            }
            if let Some(t) = c.tokens.iter().find(|t| **t as usize >= vocab_size) {
                return bad(format!(
                    "sequence {}: token {t} outside the vocabulary of {vocab_size}",
                    c.seq_id
                ));
            }
            let offset = plan.tokens.len();
            plan.chunks.push(ChunkPlan {
                seq_id: c.seq_id,
                offset,
                len: n,
                start: c.start_pos,
            });
            plan.tokens.extend_from_slice(&c.tokens);
            plan.positions.extend((c.start_pos..end).map(|p| p as u32));
            row_slots.extend(std::iter::repeat_n(c.adapter_slot, n));
            if c.all_logits {
                plan.logit_rows
                    .extend((offset..offset + n).map(|r| r as u32));
            } else {
                plan.logit_rows.push((offset + n - 1) as u32);
            }
        }
        plan.row_slots = RowSlots::new(row_slots);
        Ok(plan)
    }

    /// Number of rows in the flattened batch.
    pub fn num_rows(&self) -> usize {
        self.tokens.len()
    }

    /// Rows past the last chunk's ([`BatchPlan::padded`]).
    pub fn pad_rows(&self) -> usize {
        let chunked = self.chunks.last().map_or(0, |c| c.offset + c.len);
        self.num_rows() - chunked
    }

    /// This decode step grown to `rows` rows (a CUDA graph's size, `model::graphs`) with the
    /// uniform LoRA mapping ([`RowSlots::uniform`]). Each added row decodes token 0 at
    /// position 0 with the base model, in no chunk: on a GPU it writes its key and value into
    /// `pad_block` (a KV block no sequence holds) and attends to that one position; elsewhere
    /// its attention output is zero. Its logits follow the step's. Rows are independent, so
    /// the step's own rows come out as they would alone.
    #[cfg_attr(
        not(feature = "cuda"),
        allow(dead_code, reason = "CUDA graphs use it; tests elsewhere")
    )]
    pub fn padded(&self, rows: usize, pad_block: u32) -> Self {
        let extra = rows.saturating_sub(self.num_rows());
        let mut plan = self.clone();
        let first = plan.num_rows() as u32;
        plan.tokens.extend(std::iter::repeat_n(0, extra));
        plan.positions.extend(std::iter::repeat_n(0, extra));
        let mut slots = self.row_slots.slots().to_vec();
        slots.extend(std::iter::repeat_n(0, extra));
        plan.row_slots = RowSlots::new(slots).into_uniform();
        plan.logit_rows.extend(first..first + extra as u32);
        plan.pad_block = (extra > 0).then_some(pad_block);
        plan
    }

    /// This step with the uniform LoRA mapping ([`RowSlots::uniform`]), not padded.
    #[cfg_attr(
        not(feature = "cuda"),
        allow(dead_code, reason = "CUDA graphs use it; tests elsewhere")
    )]
    pub fn with_uniform_rows(mut self) -> Self {
        self.row_slots = self.row_slots.into_uniform();
        self
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn graph_sizes_are_1_2_4_and_multiples_of_8() {
        let sizes: Vec<usize> = (1..=17).map(super::graph_rows).collect();
        let want = [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 24];
        assert_eq!(sizes, want);
        assert_eq!(super::graph_rows(249), 256);
        assert_eq!(super::graph_rows(256), 256);
    }
}
