//! Checks of the model's CUDA kernels for `medley-lora-check` on a GPU: the paged attention
//! against an f64 reference on a mixed step (a fresh prefill, a chunked-prefill continuation,
//! decode rows over short and long histories that cross block boundaries), with and without a
//! sliding window, in every activation dtype; the fused half-precision RMSNorm and SiLU·mul, and
//! the rotary embedding with the KV write, against the candle op chains they replace; and the
//! greedy argmax against the host sampler.

use candle_core::{DType, Device, Tensor};

use super::attention::{Rope, gpu_index};
use super::attention_cuda::{AttentionShape, rope_write_and_attend, write_and_attend};
use super::batch::{BatchPlan, ForwardBatch, SeqChunk};
use super::layers::{RmsNorm, silu, silu_mul};
use super::paged_index::reference_attention;
use super::{ModelConfig, ModelError};
use crate::kv_cache::{KvCache, KvCacheConfig};

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    /// What the case covers.
    pub name: String,
    /// Rows of the step.
    pub rows: usize,
    /// Largest difference from the reference, relative to the reference's largest magnitude.
    pub rel_err: f64,
    /// Bound of `rel_err` for the dtype.
    pub tolerance: f64,
}

impl KernelCheck {
    /// Whether the case is within its bound.
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance
    }
}

const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const D: usize = 64;
/// `(sequence, cached tokens, new tokens)`.
const SEQS: [(u64, usize, usize); 6] = [
    (1, 0, 37),
    (2, 1, 1),
    (3, 17, 1),
    (4, 100, 1),
    (5, 300, 1),
    (6, 50, 20),
];

/// Runs every case on `device` (a CUDA device; the CPU's kernel has its own tests).
pub fn check_paged_attention(device: &Device) -> Result<Vec<KernelCheck>, ModelError> {
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for window in [None, Some(40)] {
            out.push(run_case(device, dtype, window)?);
        }
    }
    Ok(out)
}

/// Runs the fused kernels' cases on `device` (a CUDA device): each against the op chain it
/// replaces, which rounds at the same points, so only f32 summation order may differ.
pub fn check_fused_ops(device: &Device) -> Result<Vec<KernelCheck>, ModelError> {
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        let tolerance = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
        let on = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor, ModelError> {
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        for (rows, hidden) in [(7usize, 2048usize), (3, 4099)] {
            let x = on(random(rows * hidden, 11, dtype)?, &[rows, hidden])?;
            let w = on(random(hidden, 12, dtype)?, &[hidden])?;
            let norm = RmsNorm::new(w, 1e-5)?;
            out.push(KernelCheck {
                name: format!("fused rms_norm {dtype:?} {rows}×{hidden}"),
                rows,
                rel_err: rel_err(&norm.forward(&x)?, &norm.forward_unfused(&x)?)?,
                tolerance,
            });
        }
        for (rows, hidden) in [(7usize, 2048usize), (3, 4099)] {
            let x = on(random(rows * hidden, 15, dtype)?, &[rows, hidden])?;
            let a = on(random(rows * hidden, 16, dtype)?, &[rows, hidden])?;
            let w = on(random(hidden, 17, dtype)?, &[hidden])?;
            let norm = RmsNorm::new(w, 1e-5)?;
            let (sum, normed) = norm.add_forward(&x, &a)?;
            let (want_sum, want) = norm.add_forward_unfused(&x, &a)?;
            out.push(KernelCheck {
                name: format!("fused add+rms_norm {dtype:?} {rows}×{hidden}"),
                rows,
                rel_err: rel_err(&sum, &want_sum)?.max(rel_err(&normed, &want)?),
                tolerance,
            });
        }
        let (rows, n) = (7usize, 5632usize);
        let gate = on(
            random(rows * n, 13, dtype)?
                .iter()
                .map(|v| v * 6.0)
                .collect(),
            &[rows, n],
        )?;
        let up = on(random(rows * n, 14, dtype)?, &[rows, n])?;
        out.push(KernelCheck {
            name: format!("fused silu·mul {dtype:?} {rows}×{n}"),
            rows,
            rel_err: rel_err(&silu_mul(&gate, &up)?, &(silu(&gate)? * &up)?)?,
            tolerance,
        });
        // gate and up as the two column ranges of a stacked gate/up product.
        let stacked = Tensor::cat(&[&gate, &up], 1)?;
        let (g, u) = (stacked.narrow(1, 0, n)?, stacked.narrow(1, n, n)?);
        out.push(KernelCheck {
            name: format!("fused silu·mul {dtype:?} {rows}×{n} of a stacked gate/up"),
            rows,
            rel_err: rel_err(&silu_mul(&g, &u)?, &(silu(&gate)? * &up)?)?,
            tolerance,
        });
    }
    Ok(out)
}

/// Runs the greedy kernel's case on `device` (a CUDA device): each row's argmax and its
/// log-probability against the host sampler's greedy choice, on random rows of a 32k
/// vocabulary and rows with tied maxima, NaN and +inf. The ids must be equal; the reported
/// error is the largest log-probability difference (f32 sums in another order).
pub fn check_greedy(device: &Device) -> Result<Vec<KernelCheck>, ModelError> {
    let vocab = 32000;
    let mut rows: Vec<Vec<f32>> = (0..6)
        .map(|r| random(vocab, 20 + r, DType::F32).map(|v| v.iter().map(|x| 8.0 * x).collect()))
        .collect::<Result<_, _>>()?;
    for i in [31999, 7, 15000] {
        rows[1][i] = 40.0; // tied maxima: the lowest index wins
    }
    rows[2][3] = f32::NAN;
    rows[2][4] = f32::INFINITY;
    rows.push(vec![f32::NEG_INFINITY; vocab]);
    let n = rows.len();
    let logits = Tensor::from_vec(rows.concat(), (n, vocab), &Device::Cpu)?.to_device(device)?;
    let Some(chosen) = super::device_greedy(&logits)? else {
        return Err(ModelError::InvalidBatch(format!(
            "greedy check: no kernel serves {device:?} (MEDLEY_CUDA_GREEDY=off?)"
        )));
    };
    let mut err = 0f64;
    let mut sampler = crate::generation::Sampler::greedy();
    for (row, (id, logprob)) in rows.iter().zip(&chosen) {
        let want = sampler.next(row, &[], 0);
        let same_nan = want.logprob.is_nan() && logprob.is_nan();
        err = if want.id != *id || !(same_nan || logprob.is_finite()) {
            f64::INFINITY
        } else if same_nan {
            err
        } else {
            err.max(
                (*logprob as f64 - want.logprob as f64).abs()
                    / (want.logprob.abs() as f64).max(1.0),
            )
        };
    }
    Ok(vec![KernelCheck {
        name: format!("greedy argmax + logprob F32 {n}×{vocab}"),
        rows: n,
        rel_err: if chosen.len() == n {
            err
        } else {
            f64::INFINITY
        },
        tolerance: 1e-5,
    }])
}

/// Largest difference of `got` from `want`, relative to `want`'s largest magnitude (infinite
/// when `got` has a non-finite value).
fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64, ModelError> {
    let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let peak = want
        .iter()
        .fold(0f64, |m, x| m.max(x.abs() as f64))
        .max(1e-30);
    let err = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs()));
    Ok(
        if got.len() == want.len() && got.iter().all(|x| x.is_finite()) {
            err / peak
        } else {
            f64::INFINITY
        },
    )
}

/// Random values in `[-1, 1)`, rounded through `dtype`, as f32.
fn random(n: usize, seed: u64, dtype: DType) -> Result<Vec<f32>, ModelError> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

/// The attention layer's config: [`HEADS`] query heads and [`KV_HEADS`] kv heads of [`D`].
fn attention_config(window: Option<usize>) -> Result<ModelConfig, ModelError> {
    let mut cfg = ModelConfig::from_json_str(
        &serde_json::json!({
            "vocab_size": 16, "hidden_size": HEADS * D, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
        })
        .to_string(),
    )?;
    cfg.sliding_window = window;
    Ok(cfg)
}

/// `[rows, KV_HEADS, D]` on `dev` (f32 on the CPU, else `dtype`).
fn kv_rows(v: Vec<f32>, rows: usize, dtype: DType, dev: &Device) -> Result<Tensor, ModelError> {
    Ok(Tensor::from_vec(v, (rows, KV_HEADS, D), &Device::Cpu)?
        .to_dtype(if dev.is_cpu() { DType::F32 } else { dtype })?
        .to_device(dev)?)
}

/// A KV cache on `device` (f32 on the CPU, else `dtype`) holding [`SEQS`]' histories (random
/// keys and values of `dtype`, blocks taken in turn so that tables are not contiguous), with
/// room for their new tokens.
fn mixed_cache(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<KvCache, ModelError> {
    let pool = KvCacheConfig {
        capacity_tokens: 1024,
        block_tokens: 16,
        prefix_caching: false,
    };
    let cache_dtype = if device.is_cpu() { DType::F32 } else { dtype };
    let mut kv = KvCache::new(cfg, cache_dtype, device, pool)?;
    for (id, cached, new) in SEQS {
        kv.allocate(id, cached + new)?;
    }
    for (id, cached, _) in SEQS.iter().rev() {
        kv.reserve(*id, *cached)?;
    }
    let width = KV_HEADS * D;
    for (id, cached, _) in SEQS.into_iter().filter(|s| s.1 > 0) {
        let k = random(cached * width, id, dtype)?;
        let v = random(cached * width, id + 100, dtype)?;
        let (k, v) = (
            kv_rows(k, cached, dtype, device)?,
            kv_rows(v, cached, dtype, device)?,
        );
        kv.write(id, 0, 0, &k, &v)?;
        kv.commit(id, &vec![0u32; cached])?;
    }
    Ok(kv)
}

/// The step over [`SEQS`]' new tokens, its blocks reserved in `kv`.
fn mixed_step(kv: &mut KvCache) -> Result<BatchPlan, ModelError> {
    let batch = ForwardBatch {
        chunks: SEQS
            .iter()
            .map(|&(id, cached, new)| SeqChunk {
                seq_id: id,
                tokens: vec![0; new],
                start_pos: cached,
                adapter_slot: 0,
                all_logits: false,
            })
            .collect(),
    };
    for (id, cached, new) in SEQS {
        kv.reserve(id, cached + new)?;
    }
    BatchPlan::new(&batch, kv, 16)
}

/// The rotary embedding with the KV write in one launch against candle's rotations and the two
/// KV writes, each followed by the paged attention over the same histories, in every dtype. The
/// queries, keys and values of the fused launch are column ranges of one projection's output.
pub fn check_rope_kv_write(device: &Device) -> Result<Vec<KernelCheck>, ModelError> {
    let cfg = attention_config(None)?;
    let rope = Rope::new(&cfg, device)?;
    let mut out = Vec::new();
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
        let mut fused_kv = mixed_cache(&cfg, dtype, device)?;
        let mut chain_kv = mixed_cache(&cfg, dtype, device)?;
        let plan = mixed_step(&mut fused_kv)?;
        mixed_step(&mut chain_kv)?;
        let rows = plan.num_rows();
        let (qw, kw) = (HEADS * D, KV_HEADS * D);
        let qkv = Tensor::from_vec(
            random(rows * (qw + 2 * kw), 30, dtype)?,
            (rows, qw + 2 * kw),
            &Device::Cpu,
        )?
        .to_dtype(dtype)?
        .to_device(device)?;
        let (q, k, v) = (
            qkv.narrow(1, 0, qw)?,
            qkv.narrow(1, qw, kw)?,
            qkv.narrow(1, qw + kw, kw)?,
        );
        let tables = rope.tables(&plan.positions, dtype)?;
        let shape = |kv: &KvCache| AttentionShape {
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: D,
            block_tokens: kv.block_tokens(),
            window: None,
            scale: 1.0 / (D as f32).sqrt(),
        };
        let (Some(fused_index), Some(chain_index)) = (
            gpu_index(&plan, &fused_kv, D)?,
            gpu_index(&plan, &chain_kv, D)?,
        ) else {
            return Err(ModelError::InvalidBatch(format!(
                "no paged attention kernel for {dtype:?} on {device:?}"
            )));
        };
        let got = rope_write_and_attend(
            0,
            (&q, &k, &v),
            tables.tables(),
            &fused_kv,
            &fused_index,
            shape(&fused_kv),
        )?;
        let want = write_and_attend(
            0,
            &tables.apply(&q.reshape((rows, HEADS, D))?)?,
            &tables.apply(&k.reshape((rows, KV_HEADS, D))?)?,
            &v.reshape((rows, KV_HEADS, D))?,
            &chain_kv,
            &chain_index,
            shape(&chain_kv),
        )?;
        let pools = |kv: &KvCache| -> Result<(Tensor, Tensor), ModelError> {
            let (keys, values) = kv.layer(0)?;
            Ok((keys.clone(), values.clone()))
        };
        let ((fk, fv), (ck, cv)) = (pools(&fused_kv)?, pools(&chain_kv)?);
        out.push(KernelCheck {
            name: format!("fused rope+kv write {dtype:?} {rows} rows"),
            rows,
            rel_err: rel_err(&got, &want)?
                .max(rel_err(&fk, &ck)?)
                .max(rel_err(&fv, &cv)?),
            tolerance,
        });
    }
    Ok(out)
}

fn run_case(
    device: &Device,
    dtype: DType,
    window: Option<usize>,
) -> Result<KernelCheck, ModelError> {
    let cfg = attention_config(window)?;
    let mut dev_kv = mixed_cache(&cfg, dtype, device)?;
    let mut ref_kv = mixed_cache(&cfg, dtype, &Device::Cpu)?;
    let width = KV_HEADS * D;
    let on = |v: Vec<f32>, rows: usize, dev: &Device| kv_rows(v, rows, dtype, dev);
    let plan = mixed_step(&mut dev_kv)?;
    mixed_step(&mut ref_kv)?;
    let rows = plan.num_rows();
    let q = random(rows * HEADS * D, 7, dtype)?;
    let k = random(rows * width, 8, dtype)?;
    let v = random(rows * width, 9, dtype)?;
    let scale = 1.0 / (D as f64).sqrt();

    let Some(index) = gpu_index(&plan, &dev_kv, D)? else {
        return Err(ModelError::InvalidBatch(format!(
            "no paged attention kernel for {dtype:?} on {device:?}"
        )));
    };
    let shape = AttentionShape {
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: D,
        block_tokens: dev_kv.block_tokens(),
        window,
        scale: scale as f32,
    };
    let got = write_and_attend(
        0,
        &Tensor::from_vec(q.clone(), (rows, HEADS, D), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?,
        &on(k.clone(), rows, device)?,
        &on(v.clone(), rows, device)?,
        &dev_kv,
        &index,
        shape,
    )?
    .to_dtype(DType::F32)?
    .flatten_all()?
    .to_vec1::<f32>()?;

    let (k_ref, v_ref) = (on(k, rows, &Device::Cpu)?, on(v, rows, &Device::Cpu)?);
    let mut want = Vec::with_capacity(got.len());
    for c in &plan.chunks {
        ref_kv.write(
            c.seq_id,
            0,
            c.start,
            &k_ref.narrow(0, c.offset, c.len)?,
            &v_ref.narrow(0, c.offset, c.len)?,
        )?;
        let (keys, values) = ref_kv.gather(c.seq_id, 0, 0, c.start + c.len)?;
        let (keys, values) = (keys.to_vec3::<f32>()?, values.to_vec3::<f32>()?);
        for i in 0..c.len {
            let (r, p) = (c.offset + i, c.start + i);
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            for h in 0..HEADS {
                let kvh = h / (HEADS / KV_HEADS);
                let ks: Vec<&[f32]> = keys[kvh][lo..=p].iter().map(|x| &x[..]).collect();
                let vs: Vec<&[f32]> = values[kvh][lo..=p].iter().map(|x| &x[..]).collect();
                want.extend(reference_attention(
                    &q[(r * HEADS + h) * D..][..D],
                    &ks,
                    &vs,
                    scale,
                ));
            }
        }
    }
    let want = Tensor::from_vec(
        want.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
        got.len(),
        &Device::Cpu,
    )?;
    let rel_err = rel_err(&Tensor::from_vec(got, want.dim(0)?, &Device::Cpu)?, &want)?;
    Ok(KernelCheck {
        name: format!(
            "paged attention {dtype:?}{}",
            window.map_or(String::new(), |w| format!(" window {w}"))
        ),
        rows,
        rel_err,
        tolerance: match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            _ => 1e-2,
        },
    })
}
