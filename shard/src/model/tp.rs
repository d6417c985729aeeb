//! How a model is split over the ranks of a tensor-parallel group (Megatron style).
//!
//! q/k/v/gate/up are split by output features (rows of their weights) and o/down by input
//! features (columns), so each rank computes its heads and its share of the MLP without
//! communication and the partial outputs of o and down are summed across ranks (one all-reduce
//! each per layer). Query heads are divided evenly; key/value heads too when there are at least
//! as many as ranks, otherwise each rank holds the one KV head its query heads use (replicated,
//! as vLLM does). The embedding and `lm_head` are split by vocabulary (rows): a rank looks up
//! the tokens in its range (zeros elsewhere, summed across ranks) and computes the logits of its
//! range (gathered across ranks); see `vocab`. Norms are whole on every rank.
//!
//! LoRA factors are split like their layers (`BaseModules::split`): A whole and B split for
//! output-split layers, A split and B whole for input-split ones, so the LoRA term joins the
//! layer's partial sum with no collective of its own; merges are computed whole, then split.
//!
//! The split model, adapters and merges are tested against one rank
//! (`shard/tests/tensor_parallel.rs`) and end to end (`medley serve --num-shard N`).

use std::ops::Range;

use super::{ModelConfig, ModelError};

/// This rank's place in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpLayout {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
}

impl Default for TpLayout {
    fn default() -> Self {
        Self::SINGLE
    }
}

/// The part of every layer one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalShape {
    /// Query heads on this rank.
    pub heads: usize,
    /// Key/value heads on this rank.
    pub kv_heads: usize,
    /// Rows of q_proj (and columns of o_proj) on this rank.
    pub q_rows: Range<usize>,
    /// Rows of k_proj and v_proj on this rank.
    pub kv_rows: Range<usize>,
    /// Rows of gate_proj and up_proj (and columns of down_proj) on this rank.
    pub mlp_rows: Range<usize>,
    /// Rows of the embedding and `lm_head` (vocabulary ids) on this rank: consecutive chunks of
    /// `ceil(vocab / world)`, the last one shorter when the vocabulary does not divide.
    pub vocab_rows: Range<usize>,
}

impl TpLayout {
    /// A group of one.
    pub const SINGLE: Self = Self { rank: 0, world: 1 };

    /// Rank `rank` of `world`.
    pub fn new(rank: usize, world: usize) -> Result<Self, ModelError> {
        if world == 0 || rank >= world {
            return Err(ModelError::InvalidConfig(format!(
                "rank {rank} of a tensor-parallel group of {world}"
            )));
        }
        Ok(Self { rank, world })
    }

    /// This rank's slice of a model shaped like `cfg`, or why the model cannot be split this way.
    pub fn split(&self, cfg: &ModelConfig) -> Result<LocalShape, ModelError> {
        let (w, r, d) = (self.world, self.rank, cfg.head_dim);
        let (h, kv, inter) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let refuse = |what: String| {
            Err(ModelError::Unsupported(format!(
                "{what}, so the model cannot be split over {w} tensor-parallel shards; \
                 choose a --num-shard that divides it"
            )))
        };
        if !h.is_multiple_of(w) {
            return refuse(format!("{h} attention heads do not divide by {w}"));
        }
        if !inter.is_multiple_of(w) {
            return refuse(format!("intermediate size {inter} does not divide by {w}"));
        }
        let (kv_heads, first_kv) = if kv >= w {
            if !kv.is_multiple_of(w) {
                return refuse(format!("{kv} key/value heads do not divide by {w}"));
            }
            (kv / w, r * (kv / w))
        } else {
            // Fewer KV heads than ranks: each rank's query heads must share one KV head.
            if !w.is_multiple_of(kv) {
                return refuse(format!(
                    "{kv} key/value heads (fewer than the shards) do not divide {w}"
                ));
            }
            (1, r * kv / w)
        };
        let heads = h / w;
        let mlp = inter / w;
        let chunk = cfg.vocab_size.div_ceil(w);
        let vocab_rows = (r * chunk).min(cfg.vocab_size)..((r + 1) * chunk).min(cfg.vocab_size);
        Ok(LocalShape {
            vocab_rows,
            heads,
            kv_heads,
            q_rows: r * heads * d..(r + 1) * heads * d,
            kv_rows: first_kv * d..(first_kv + kv_heads) * d,
            mlp_rows: r * mlp..(r + 1) * mlp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, kv: usize, inter: usize) -> ModelConfig {
        let mut c = crate::adapters::base::tests::tiny_config();
        c.num_attention_heads = h;
        c.num_key_value_heads = kv;
        c.intermediate_size = inter;
        c.head_dim = 16;
        c
    }

    #[test]
    fn heads_and_mlp_divide_evenly() {
        let c = cfg(32, 4, 5632);
        let s = TpLayout::new(1, 4)
            .expect("layout")
            .split(&c)
            .expect("split");
        assert_eq!((s.heads, s.kv_heads), (8, 1));
        assert_eq!(s.q_rows, 128..256);
        assert_eq!(s.kv_rows, 16..32);
        assert_eq!(s.mlp_rows, 1408..2816);
        assert_eq!(
            s.vocab_rows,
            c.vocab_size.div_ceil(4)..2 * c.vocab_size.div_ceil(4)
        );
        let one = TpLayout::SINGLE.split(&c).expect("single");
        assert_eq!((one.heads, one.kv_heads), (32, 4));
        assert_eq!(
            (one.q_rows, one.kv_rows, one.mlp_rows),
            (0..512, 0..64, 0..5632)
        );
    }

    #[test]
    fn fewer_kv_heads_than_ranks_are_replicated() {
        // 4 query heads, 2 KV heads over 4 ranks: ranks 0-1 use KV head 0, ranks 2-3 KV head 1.
        let c = cfg(4, 2, 176);
        let kv: Vec<_> = (0..4)
            .map(|r| {
                let s = TpLayout::new(r, 4)
                    .expect("layout")
                    .split(&c)
                    .expect("split");
                assert_eq!((s.heads, s.kv_heads), (1, 1));
                s.kv_rows
            })
            .collect();
        assert_eq!(kv, vec![0..16, 0..16, 16..32, 16..32]);
    }

    #[test]
    fn indivisible_models_are_refused_clearly() {
        for (c, world, what) in [
            (cfg(4, 2, 176), 3, "4 attention heads do not divide by 3"),
            (
                cfg(8, 8, 100),
                8,
                "intermediate size 100 does not divide by 8",
            ),
            (cfg(12, 6, 120), 4, "6 key/value heads do not divide by 4"),
            (
                cfg(12, 3, 120),
                4,
                "3 key/value heads (fewer than the shards) do not divide 4",
            ),
        ] {
            let err = TpLayout::new(0, world)
                .expect("layout")
                .split(&c)
                .expect_err(what)
                .to_string();
            assert!(err.contains(what), "{err}");
            assert!(err.contains("--num-shard"), "{err}");
        }
        assert!(TpLayout::new(2, 2).is_err());
        assert!(TpLayout::new(0, 0).is_err());
    }
}
