//! Self-attention over a ragged batch: projections (with LoRA hooks) and rotary embeddings for all
//! rows at once, then causal grouped-query attention against the KV cache: on the CPU (f32)
//! through the block tables with the tiled kernel of `paged_attention`, on a GPU with the
//! paged CUDA kernels (one launch per layer for the whole batch, `attention_cuda`), elsewhere
//! per sequence over gathered keys.

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
use super::attention_cuda;
use super::batch::BatchPlan;
use super::cpu_storage;
use super::layers::{Linear, Projections, matmul_in};
use super::lora::{LoraDelta, TargetModule};
use super::paged_attention::{self, Heads, PagedLayer, SeqSpan};
use super::{LocalShape, ModelConfig, ModelError};
use crate::kv_cache::KvCache;

/// Rotary position embedding (non-interleaved "rotate_half" layout, as transformers' Llama).
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[1, head_dim / 2]` f32 inverse frequencies.
    inv_freq: Tensor,
}

/// cos/sin for the rows of one batch, `[rows, 1, head_dim / 2]` in the compute dtype.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Frequencies for `cfg` (see [`super::config::rope_inv_freq`]) on `device`.
    pub fn new(cfg: &ModelConfig, device: &Device) -> candle_core::Result<Self> {
        let inv = super::config::rope_inv_freq(cfg);
        let half = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, half), device)?,
        })
    }

    /// cos/sin of `positions` (one per row): angles `p * inv_freq` in f32 like transformers,
    /// then rounded to `dtype` (transformers casts cos/sin to the activations' dtype).
    pub fn tables(&self, positions: &[u32], dtype: DType) -> candle_core::Result<RopeTables> {
        let rows = positions.len();
        let half = self.inv_freq.dim(1)?;
        let pos: Vec<f32> = positions.iter().map(|p| *p as f32).collect();
        let pos = Tensor::from_vec(pos, (rows, 1), self.inv_freq.device())?;
        let angles = pos.broadcast_mul(&self.inv_freq)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(dtype)?.reshape((rows, 1, half))?,
            sin: angles.sin()?.to_dtype(dtype)?.reshape((rows, 1, half))?,
        })
    }
}

/// cos/sin of every position below [`RopeTable::len`], `[len, head_dim / 2]` each in the
/// compute dtype, computed as [`Rope::tables`] computes a step's (elementwise, hence the same
/// values bit for bit): a step whose positions are on the GPU gathers its rows from it
/// (`RopeTable::at`, CUDA builds) instead of computing them.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The table of positions `0..len` in `dtype`.
    pub fn table(&self, len: usize, dtype: DType) -> candle_core::Result<RopeTable> {
        let positions: Vec<u32> = (0..len as u32).collect();
        let t = self.tables(&positions, dtype)?;
        let half = self.inv_freq.dim(1)?;
        Ok(RopeTable {
            cos: t.cos.reshape((len, half))?,
            sin: t.sin.reshape((len, half))?,
        })
    }
}

impl RopeTable {
    /// Positions it holds.
    pub fn len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Whether it holds no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of `positions` (`[rows]` u32 on the GPU): a step's tables.
    #[cfg(feature = "cuda")]
    pub(crate) fn at(&self, positions: &Tensor) -> candle_core::Result<RopeTables> {
        let rows = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        let gather =
            |t: &Tensor| super::gather_cuda::gather_rows(t, positions)?.reshape((rows, 1, half));
        Ok(RopeTables {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
        })
    }
}

impl RopeTables {
    /// The cos and sin tables, `[rows, 1, head_dim / 2]` each.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x: [rows, heads, head_dim]` (row `i` at the position the tables were built for).
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, heads, d) = x.dims3()?;
        // Each row is its own "batch" entry of length 1, so positions can be arbitrary.
        let y = candle_nn::rotary_emb::rope_thd(
            &x.reshape((rows, 1, heads, d))?.contiguous()?,
            &self.cos,
            &self.sin,
        )?;
        y.reshape((rows, heads, d))
    }
}

/// A step's index for the paged CUDA kernels, on the device.
#[cfg(feature = "cuda")]
pub(crate) use super::attention_cuda::DeviceIndex as GpuIndex;

/// A step's index for the paged CUDA kernels (none without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub(crate) enum GpuIndex {}

/// What every layer's attention reads in one step.
pub(crate) struct AttentionStep<'a> {
    /// cos/sin of the rows' positions.
    pub rope: &'a RopeTables,
    /// The flattened batch.
    pub plan: &'a BatchPlan,
    /// The KV pool and block tables.
    pub kv: &'a KvCache,
    /// The step's index on the GPU when the paged CUDA kernels serve the step.
    pub gpu: Option<&'a GpuIndex>,
}

/// The step's index for the paged CUDA kernels when they serve `kv` (a CUDA pool of f32, bf16
/// or f16 with heads of at most 256), uploaded once for all layers; `None` elsewhere, and with
/// `MEDLEY_CUDA_ATTENTION=gather` (the per-sequence candle path, for comparisons).
pub(crate) fn gpu_index(
    plan: &BatchPlan,
    kv: &KvCache,
    head_dim: usize,
) -> Result<Option<GpuIndex>, ModelError> {
    #[cfg(feature = "cuda")]
    if paged_kernels(kv, head_dim) {
        let index = super::paged_index::PagedIndex::new(plan, kv)?;
        return Ok(Some(GpuIndex::upload(&index, kv.device())?));
    }
    let _ = (plan, kv, head_dim);
    Ok(None)
}

/// Whether the paged CUDA kernels serve `kv` (see [`gpu_index`]).
#[cfg(feature = "cuda")]
fn paged_kernels(kv: &KvCache, head_dim: usize) -> bool {
    let gather = super::cuda_launch::env_is!("MEDLEY_CUDA_ATTENTION", "gather");
    kv.device().is_cuda() && attention_cuda::supported(kv.dtype(), head_dim) && !gather
}

/// Whether a step's attention over `kv` is Medley's kernels alone: the paged kernels, rotating
/// and writing in one launch (what a CUDA graph can record; candle's rotary path copies
/// strided tensors, which uploads their shapes).
#[cfg(feature = "cuda")]
pub(crate) fn recordable(kv: &KvCache, head_dim: usize) -> bool {
    paged_kernels(kv, head_dim) && fused_rope()
}

/// Whether the paged CUDA kernels rotate and write in one launch (not `MEDLEY_CUDA_FUSED=off`).
fn fused_rope() -> bool {
    #[cfg(feature = "cuda")]
    return !super::fused_cuda::turned_off();
    #[cfg(not(feature = "cuda"))]
    false
}

/// The attention block of one decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v.
    qkv: Projections,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    sliding_window: Option<usize>,
}

/// The four projection weights of an attention block.
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    /// `[heads * head_dim, hidden]`
    pub q: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub k: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub v: Linear,
    /// `[hidden, heads * head_dim]`
    pub o: Linear,
}

impl Attention {
    /// Bytes of the four projection weights (quantized or dense).
    pub fn weight_bytes(&self) -> usize {
        self.qkv.weight_bytes() + self.o.weight_bytes()
    }

    /// Builds the block from this rank's weights (`local` says which heads they hold), q, k and v
    /// in one matmul when `stack` is set (see [`Projections`]).
    pub fn new(
        cfg: &ModelConfig,
        w: AttentionWeights,
        local: &LocalShape,
        stack: bool,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: Projections::new(vec![w.q, w.k, w.v], stack)?,
            o: w.o,
            num_heads: local.heads,
            num_kv_heads: local.kv_heads,
            head_dim: cfg.head_dim,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
            sliding_window: cfg.sliding_window,
        })
    }

    /// `x: [rows, hidden]` (normalised) → `[rows, hidden]`. Writes this layer's keys and values
    /// of every chunk into the step's KV pool (whose blocks must already be reserved).
    pub(crate) fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        step: &AttentionStep<'_>,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        let (rope, plan, kv) = (step.rope, step.plan, step.kv);
        let rows = x.dim(0)?;
        let slots = &plan.row_slots;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let modules = [TargetModule::Q, TargetModule::K, TargetModule::V];
        let [q, k, v] = self.qkv.forward_lora(x, layer, modules, lora, slots)?;
        let attn = match step.gpu {
            Some(index) if fused_rope() => self.gpu_fused(layer, (&q, &k, &v), rope, kv, index)?,
            gpu => {
                let q = rope.apply(&q.reshape((rows, h, d))?)?;
                let k = rope.apply(&k.reshape((rows, kvh, d))?)?;
                let v = v.reshape((rows, kvh, d))?;
                match gpu {
                    Some(index) => self.gpu(layer, &q, &k, &v, kv, index)?,
                    None => self.host(layer, &q, &k, &v, plan, kv)?,
                }
            }
        };
        Ok(lora.apply(layer, TargetModule::O, &attn, self.o.forward(&attn)?, slots)?)
    }

    /// The shape of this block's attention launches over `kv`.
    #[cfg(feature = "cuda")]
    fn shape(&self, kv: &KvCache) -> attention_cuda::AttentionShape {
        attention_cuda::AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_tokens: kv.block_tokens(),
            window: self.sliding_window,
            scale: self.scale as f32,
        }
    }

    /// Rotates, writes and attends through the paged CUDA kernels: one launch rotates the
    /// queries and keys and writes the keys and values, one attends, for the whole batch.
    /// `q: [rows, heads * d]`, `k`/`v`: `[rows, kv_heads * d]`.
    #[cfg(feature = "cuda")]
    fn gpu_fused(
        &self,
        layer: usize,
        qkv: (&Tensor, &Tensor, &Tensor),
        rope: &RopeTables,
        kv: &KvCache,
        index: &GpuIndex,
    ) -> Result<Tensor, ModelError> {
        let shape = self.shape(kv);
        attention_cuda::rope_write_and_attend(layer, qkv, rope.tables(), kv, index, shape)
    }

    #[cfg(not(feature = "cuda"))]
    fn gpu_fused(
        &self,
        _: usize,
        _: (&Tensor, &Tensor, &Tensor),
        _: &RopeTables,
        _: &KvCache,
        index: &GpuIndex,
    ) -> Result<Tensor, ModelError> {
        match *index {}
    }

    /// Writes and attends through the paged CUDA kernels: two writes and one attention launch
    /// for the whole batch.
    #[cfg(feature = "cuda")]
    fn gpu(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: &KvCache,
        index: &GpuIndex,
    ) -> Result<Tensor, ModelError> {
        attention_cuda::write_and_attend(layer, q, k, v, kv, index, self.shape(kv))
    }

    #[cfg(not(feature = "cuda"))]
    fn gpu(
        &self,
        _: usize,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &KvCache,
        index: &GpuIndex,
    ) -> Result<Tensor, ModelError> {
        match *index {}
    }

    /// Writes chunk by chunk, then attends with the CPU kernel (f32 on the CPU) or per sequence
    /// over gathered keys. `q: [rows, heads, d]`, `k`/`v`: `[rows, kv_heads, d]`.
    fn host(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        plan: &BatchPlan,
        kv: &KvCache,
    ) -> Result<Tensor, ModelError> {
        for c in &plan.chunks {
            kv.write(
                c.seq_id,
                layer,
                c.start,
                &k.narrow(0, c.offset, c.len)?,
                &v.narrow(0, c.offset, c.len)?,
            )?;
        }
        Ok(if cpu_storage::supported(q) {
            self.paged(layer, q, plan, kv)?
        } else {
            let mut outs = Vec::with_capacity(plan.chunks.len());
            for c in &plan.chunks {
                // Keys visible to the first query of the chunk start here (sliding window).
                let lo = match self.sliding_window {
                    Some(w) => (c.start + 1).saturating_sub(w),
                    None => 0,
                };
                let (keys, values) = kv.gather(c.seq_id, layer, lo, c.start + c.len - lo)?;
                let qc = q.narrow(0, c.offset, c.len)?;
                outs.push(self.attend(&qc, &keys, &values, c.start, lo)?);
            }
            // Padding rows (`BatchPlan::padded`) attend to nothing here: zero, as the CPU
            // kernel leaves them.
            let pad = plan.pad_rows();
            if pad > 0 {
                let width = self.num_heads * self.head_dim;
                outs.push(Tensor::zeros((pad, width), q.dtype(), q.device())?);
            }
            if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0)?
            }
        })
    }

    /// Attention of every chunk through the block tables with the CPU kernel (tiled, online
    /// softmax; see [`paged_attention`]). `q: [rows, heads, d]`; returns `[rows, heads * d]`.
    fn paged(
        &self,
        layer: usize,
        q: &Tensor,
        plan: &BatchPlan,
        kv: &KvCache,
    ) -> Result<Tensor, ModelError> {
        let (keys, values) = kv.layer(layer)?;
        let mut spans = Vec::with_capacity(plan.chunks.len());
        for c in &plan.chunks {
            let blocks = kv.blocks(c.seq_id).ok_or_else(|| {
                ModelError::InvalidBatch(format!("sequence {} has no kv cache entry", c.seq_id))
            })?;
            spans.push(SeqSpan {
                row: c.offset,
                len: c.len,
                start: c.start,
                blocks,
            });
        }
        let heads = Heads {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            dim: self.head_dim,
            scale: self.scale,
        };
        let q = q.contiguous()?;
        let out = cpu_storage::with_cpu_f32(&q, keys, values, |q, k, v| {
            let layer = PagedLayer {
                keys: k,
                values: v,
                block_size: kv.block_tokens(),
            };
            paged_attention::paged_attention(q, &spans, &layer, heads, self.sliding_window)
        })?;
        let rows = q.dim(0)?;
        Ok(Tensor::from_vec(
            out,
            (rows, self.num_heads * self.head_dim),
            q.device(),
        )?)
    }

    /// Attention of one sequence's new queries `q: [n, heads, d]` (positions `start..start+n`)
    /// over its cached keys/values `[kv_heads, len, d]` (positions `lo..start+n`).
    /// Returns `[n, heads * d]`.
    fn attend(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        start: usize,
        lo: usize,
    ) -> candle_core::Result<Tensor> {
        let dtype = q.dtype();
        let (n, h, d) = q.dims3()?;
        let kvh = self.num_kv_heads;
        let g = h / kvh;
        let len = keys.dim(1)?;
        // Query head j uses kv head j / g; rows of one kv head are ordered (token, group).
        let q = q
            .reshape((n, kvh, g, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kvh, n * g, d))?;
        // transformers: (q kᵀ) * scaling in the compute dtype, mask, softmax in f32, cast back.
        let scores = matmul_in(&q, &keys.t()?, dtype)?
            .affine(self.scale, 0.0)?
            .to_dtype(DType::F32)?;
        let scores = if n > 1 {
            let mask = self.mask(n, len, start, lo, q.device())?;
            scores
                .reshape((kvh, n, g, len))?
                .broadcast_add(&mask)?
                .reshape((kvh, n * g, len))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = matmul_in(&probs, values, dtype)?;
        out.reshape((kvh, n, g, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, h * d))
    }

    /// Additive mask `[n, 1, len]`: query `i` (position `start + i`) sees key `j` (position
    /// `lo + j`) iff `lo + j <= start + i` and, with a sliding window `w`, `lo + j > start + i - w`.
    fn mask(
        &self,
        n: usize,
        len: usize,
        start: usize,
        lo: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut m = vec![0f32; n * len];
        for i in 0..n {
            let p = start + i;
            for j in 0..len {
                let kp = lo + j;
                let outside = self.sliding_window.is_some_and(|w| kp + w <= p);
                if kp > p || outside {
                    m[i * len + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (n, 1, len), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window: Option<usize>) -> ModelConfig {
        let mut c = ModelConfig::from_json_str(
            &serde_json::json!({
                "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            })
            .to_string(),
        )
        .unwrap();
        c.sliding_window = window;
        c
    }

    fn attention(window: Option<usize>) -> Attention {
        let c = cfg(window);
        let eye = |r: usize, k: usize| {
            Linear::new(
                Tensor::eye(r.max(k), DType::F32, &Device::Cpu)
                    .unwrap()
                    .narrow(0, 0, r)
                    .unwrap()
                    .narrow(1, 0, k)
                    .unwrap(),
                DType::F32,
            )
            .unwrap()
        };
        let local = crate::model::TpLayout::SINGLE.split(&c).unwrap();
        Attention::new(
            &c,
            AttentionWeights {
                q: eye(8, 8),
                k: eye(4, 8),
                v: eye(4, 8),
                o: eye(8, 8),
            },
            &local,
            false,
        )
        .unwrap()
    }

    #[test]
    fn mask_is_causal_with_window() {
        let a = attention(Some(2));
        // Chunk at positions 3..6, keys from position 2.
        let m = a
            .mask(3, 4, 3, 2, &Device::Cpu)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let vis: Vec<Vec<bool>> = m
            .iter()
            .map(|r| r.iter().map(|v| v.is_finite()).collect())
            .collect();
        // p=3 sees {2,3}; p=4 sees {3,4}; p=5 sees {4,5}.
        assert_eq!(
            vis,
            vec![
                vec![true, true, false, false],
                vec![false, true, true, false],
                vec![false, false, true, true],
            ]
        );
        let causal = attention(None)
            .mask(2, 3, 1, 0, &Device::Cpu)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(causal[0][1].is_finite() && !causal[0][2].is_finite() && causal[1][2].is_finite());
    }

    /// `attend` against a direct f64 softmax-attention on random data (GQA with 2 query heads per
    /// kv head); f32 matmul/softmax rounding stays far below 1e-5.
    #[test]
    fn attend_matches_reference() {
        let a = attention(None);
        let dev = Device::Cpu;
        let (n, start, len) = (3usize, 2usize, 5usize);
        let q = Tensor::randn(0f32, 1.0, (n, 2, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, len, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, len, 4), &dev).unwrap();
        let out = a
            .attend(&q, &k, &v, start, 0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (q3, k3, v3) = (
            q.to_vec3::<f32>().unwrap(),
            k.to_vec3::<f32>().unwrap(),
            v.to_vec3::<f32>().unwrap(),
        );
        for i in 0..n {
            for hh in 0..2 {
                let visible = start + i + 1;
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..4)
                            .map(|x| q3[i][hh][x] as f64 * k3[0][j][x] as f64)
                            .sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for x in 0..4 {
                    let want: f64 = (0..visible)
                        .map(|j| (s[j] - mx).exp() / z * v3[0][j][x] as f64)
                        .sum();
                    let got = out[i][hh * 4 + x] as f64;
                    assert!((got - want).abs() < 1e-5, "{i} {hh} {x}: {got} vs {want}");
                }
            }
        }
    }

    /// The table's rows are a step's tables at those positions, bit for bit, in every dtype
    /// (a step on the GPU gathers its rows from the table instead of computing them).
    #[test]
    fn the_table_holds_each_positions_tables() {
        let rope = Rope::new(&cfg(None), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let table = rope.table(50, dtype).unwrap();
            assert_eq!(table.len(), 50);
            let positions = [0u32, 49, 7, 7, 31];
            let step = rope.tables(&positions, dtype).unwrap();
            for (r, &p) in positions.iter().enumerate() {
                for (all, one) in [(&table.cos, &step.cos), (&table.sin, &step.sin)] {
                    let want = one.get(r).unwrap().flatten_all().unwrap();
                    let got = all.get(p as usize).unwrap();
                    let bits =
                        |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    let (w, g) = (bits(&want), bits(&got));
                    assert!(
                        w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?} position {p}"
                    );
                }
            }
        }
    }

    /// Rotating by the tables equals the rotate_half formula evaluated directly.
    #[test]
    fn rope_matches_rotate_half() {
        let c = cfg(None);
        let rope = Rope::new(&c, &Device::Cpu).unwrap();
        let positions = [0u32, 7, 3];
        let t = rope.tables(&positions, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 2, 4), &Device::Cpu).unwrap();
        let y = t.apply(&x).unwrap().to_vec3::<f32>().unwrap();
        let xv = x.to_vec3::<f32>().unwrap();
        let inv = super::super::config::rope_inv_freq(&c);
        for (r, p) in positions.iter().enumerate() {
            for hh in 0..2 {
                for i in 0..2 {
                    let ang = *p as f32 * inv[i];
                    let (x1, x2) = (xv[r][hh][i], xv[r][hh][i + 2]);
                    assert!((y[r][hh][i] - (x1 * ang.cos() - x2 * ang.sin())).abs() < 1e-6);
                    assert!((y[r][hh][i + 2] - (x2 * ang.cos() + x1 * ang.sin())).abs() < 1e-6);
                }
            }
        }
    }
}
