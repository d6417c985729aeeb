//! Attention of a decode step on the CPU in one parallel pass.
//!
//! In a decode step every sequence has one new query row. Running `Attention::attend` per
//! sequence costs about twenty small candle ops each (views, copies, two tiny gemms, a softmax),
//! which at 16 sequences × every layer is over a thousand dispatches a step, mostly on one
//! thread. Here the queries of all sequences are read in place, each sequence's cached keys and
//! values are read in place from its KV buffers, and the (sequence, kv head) pairs run in
//! parallel. The arithmetic is that of `attend` for one query (transformers' order): scores
//! `(q · k) * scale` in f32, a max-subtracted softmax in f32, then the probability-weighted sum
//! of the values; only the summation order inside the dot products differs (f32 rounding).

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Cached keys and values of one sequence: views `[kv_heads, len, head_dim]` of its buffers.
pub(crate) struct SeqKv {
    /// Keys.
    pub keys: Tensor,
    /// Values.
    pub values: Tensor,
}

/// The shape of the heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Features per head.
    pub dim: usize,
    /// Score scale (`1 / sqrt(dim)`).
    pub scale: f64,
}

/// Whether [`decode_attention`] can serve a step whose queries are `q`.
pub(crate) fn supported(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32
}

/// A `[len, dim]` matrix inside a CPU f32 storage: `row(j)` is `dim` contiguous values.
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    row_stride: usize,
    dim: usize,
}

impl Rows<'_> {
    fn row(&self, j: usize) -> &[f32] {
        let at = self.offset + j * self.row_stride;
        &self.data[at..at + self.dim]
    }
}

/// The rows of kv head `head` of a `[kv_heads, len, dim]` view.
fn head_rows<'a>(
    data: &'a [f32],
    layout: &Layout,
    head: usize,
    dim: usize,
) -> candle_core::Result<Rows<'a>> {
    let stride = layout.stride();
    let dims = layout.dims();
    if dims.len() != 3 || dims[2] != dim || stride[2] != 1 {
        candle_core::bail!("decode attention: unexpected kv view {dims:?} / {stride:?}");
    }
    let rows = Rows {
        data,
        offset: layout.start_offset() + head * stride[0],
        row_stride: stride[1],
        dim,
    };
    // The last row must lie inside the storage.
    if dims[1] > 0 && rows.offset + (dims[1] - 1) * rows.row_stride + dim > data.len() {
        candle_core::bail!("decode attention: kv view out of range");
    }
    Ok(rows)
}

fn f32_data(storage: &Storage) -> candle_core::Result<&[f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("decode attention needs f32 tensors on the CPU"),
    }
}

/// `Σ a[i] b[i]` in 8 partial sums (vectorisable without reassociation flags).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Attention of one query row per sequence: `q: [rows, heads, dim]` (row `r` belongs to
/// `kv[r]`, whose views hold every key it may see, its own included). Returns
/// `[rows, heads * dim]`.
pub(crate) fn decode_attention(q: &Tensor, kv: &[SeqKv], h: Heads) -> candle_core::Result<Tensor> {
    let rows = q.dim(0)?;
    if q.dims() != [rows, h.heads, h.dim]
        || kv.len() != rows
        || h.kv_heads == 0
        || !h.heads.is_multiple_of(h.kv_heads)
    {
        candle_core::bail!(
            "decode attention: q {:?} for {} sequences and {h:?}",
            q.dims(),
            kv.len()
        );
    }
    let group = h.heads / h.kv_heads;
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let q_data = match q_layout.contiguous_offsets() {
        Some((a, b)) => &f32_data(&q_storage)?[a..b],
        None => candle_core::bail!("decode attention: q is not contiguous"),
    };
    let guards: Vec<_> = kv
        .iter()
        .map(|s| (s.keys.storage_and_layout(), s.values.storage_and_layout()))
        .collect();
    // Per (sequence, kv head): the key rows and value rows.
    let mut tasks = Vec::with_capacity(rows * h.kv_heads);
    for ((ks, kl), (vs, vl)) in &guards {
        let (kd, vd) = (f32_data(ks)?, f32_data(vs)?);
        if kl.dims() != vl.dims() {
            candle_core::bail!(
                "decode attention: keys {:?}, values {:?}",
                kl.dims(),
                vl.dims()
            );
        }
        for head in 0..h.kv_heads {
            let len = kl.dims()[1];
            tasks.push((
                head_rows(kd, kl, head, h.dim)?,
                head_rows(vd, vl, head, h.dim)?,
                len,
            ));
        }
    }
    let mut out = vec![0f32; rows * h.heads * h.dim];
    let width = group * h.dim;
    let scale = h.scale as f32;
    // The query heads of kv head `kh` in row `r` are `kh * group ..`: contiguous in `q` and in
    // the output alike.
    out.par_chunks_mut(width)
        .zip(q_data.par_chunks(width))
        .zip(tasks.par_iter())
        .for_each(|((o, qs), (keys, values, len))| {
            let mut probs = vec![0f32; *len];
            for (qh, oh) in qs.chunks_exact(h.dim).zip(o.chunks_exact_mut(h.dim)) {
                let mut max = f32::NEG_INFINITY;
                for (j, p) in probs.iter_mut().enumerate() {
                    *p = dot(qh, keys.row(j)) * scale;
                    max = max.max(*p);
                }
                let mut sum = 0f32;
                for p in probs.iter_mut() {
                    *p = (*p - max).exp();
                    sum += *p;
                }
                let inv = 1.0 / sum;
                for (j, p) in probs.iter().enumerate() {
                    let w = p * inv;
                    for (acc, v) in oh.iter_mut().zip(values.row(j)) {
                        *acc += w * v;
                    }
                }
            }
        });
    drop(guards);
    Tensor::from_vec(out, (rows, h.heads * h.dim), q.device())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Three sequences of different lengths whose views start inside larger head-major buffers
    /// (as the KV cache's do), GQA with 4 query heads per kv head, against softmax attention in
    /// f64: sums of 40 products of values around 1 in f32 stay far below 1e-5.
    #[test]
    fn matches_f64_softmax_attention() {
        let dev = Device::Cpu;
        let h = Heads {
            heads: 8,
            kv_heads: 2,
            dim: 20,
            scale: 1.0 / (20f64).sqrt(),
        };
        let (cap, spans) = (16usize, [(0usize, 1usize), (3, 9), (5, 11)]);
        let q = Tensor::randn(0f32, 1.0, (3, h.heads, h.dim), &dev).unwrap();
        let mut seqs = vec![];
        for &(lo, len) in &spans {
            let kb = Tensor::randn(0f32, 1.0, (h.kv_heads, cap, h.dim), &dev).unwrap();
            let vb = Tensor::randn(0f32, 1.0, (h.kv_heads, cap, h.dim), &dev).unwrap();
            seqs.push(SeqKv {
                keys: kb.narrow(1, lo, len).unwrap(),
                values: vb.narrow(1, lo, len).unwrap(),
            });
        }
        let got = decode_attention(&q, &seqs, h)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let q3 = q.to_vec3::<f32>().unwrap();
        let group = h.heads / h.kv_heads;
        for (r, s) in seqs.iter().enumerate() {
            let (k3, v3) = (
                s.keys.to_vec3::<f32>().unwrap(),
                s.values.to_vec3::<f32>().unwrap(),
            );
            for head in 0..h.heads {
                let kh = head / group;
                let scores: Vec<f64> = k3[kh]
                    .iter()
                    .map(|key| {
                        key.iter()
                            .zip(&q3[r][head])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * h.scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for x in 0..h.dim {
                    let want: f64 = scores
                        .iter()
                        .zip(&v3[kh])
                        .map(|(s, v)| (s - max).exp() / z * v[x] as f64)
                        .sum();
                    let g = got[r][head * h.dim + x] as f64;
                    assert!((g - want).abs() < 1e-5, "{r} {head} {x}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let h = Heads {
            heads: 4,
            kv_heads: 2,
            dim: 8,
            scale: 0.5,
        };
        let q = Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap();
        let kv = |d: usize| SeqKv {
            keys: Tensor::zeros((2, 3, d), DType::F32, &dev).unwrap(),
            values: Tensor::zeros((2, 3, d), DType::F32, &dev).unwrap(),
        };
        // One sequence for two rows; a head dim that does not match.
        assert!(decode_attention(&q, &[kv(8)], h).is_err());
        assert!(decode_attention(&q, &[kv(8), kv(6)], h).is_err());
        assert!(decode_attention(&q, &[kv(8), kv(8)], h).is_ok());
    }
}
