//! The differentiable Llama: the same computation as Hugging Face `LlamaForCausalLM` (and as
//! Medley's inference forward), written with plain candle ops so that autograd reaches every
//! weight.
//!
//! Batches are `[batch, time]` token ids, right-padded: attention is causal, so a real token never
//! sees the padding after it and padded positions only need to be left out of the loss. Every
//! projection runs on the flattened `[batch * time, features]` rows.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use medley_shard::model::ModelConfig;
use medley_shard::model::config::rope_inv_freq;
use medley_shard::model::weights::Checkpoint;

use crate::TrainError;
use crate::lora::{Dropout, LoraSet, Target};
use crate::params::{Init, ParamStore};
use crate::shape::{check_trainable, read_config};

/// How a fresh model's weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitConfig {
    /// Seed of every tensor's stream.
    pub seed: u64,
    /// Standard deviation of the embedding and of the projections (transformers'
    /// `initializer_range`); `o_proj` and `down_proj` use `std / sqrt(2 * layers)` (GPT-2's scaled
    /// residual init), so the residual stream does not grow with depth.
    pub std: f64,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self { seed: 0, std: 0.02 }
    }
}

/// The weights of one decoder layer (tensors sharing storage with the store's variables).
#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A Llama-family causal LM whose weights are candle [`candle_core::Var`]s.
#[derive(Debug, Clone)]
pub struct Llama {
    shape: ModelConfig,
    params: ParamStore,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
}

/// The extras of one forward call: an adapter and, when training it, its dropout.
#[derive(Debug, Default)]
pub struct ForwardOptions<'a> {
    /// The LoRA adapter added to the targeted projections.
    pub lora: Option<&'a LoraSet>,
    /// LoRA dropout (training only).
    pub dropout: Option<&'a mut Dropout>,
    /// A second adapter added on top without dropout, e.g. the detached sum of other adapters
    /// ([`LoraSet::concat`]) when training one adapter to work inside their merge.
    pub frozen: Option<&'a LoraSet>,
}

impl Llama {
    /// A freshly initialised model.
    pub fn init(
        shape: &ModelConfig,
        init: InitConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        check_trainable(shape)?;
        let mut params = ParamStore::new(dtype, device.clone());
        let resid = init.std / (2.0 * shape.num_hidden_layers as f64).sqrt();
        for (name, dims) in shape.weight_shapes() {
            let how = if dims.len() == 1 {
                Init::Ones
            } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                Init::Normal(resid)
            } else {
                Init::Normal(init.std)
            };
            params.init(init.seed, &name, &dims, how)?;
        }
        Self::from_params(shape.clone(), params)
    }

    /// Loads `dir/config.json` and the weights of `dir` in any layout Medley serves: one
    /// safetensors file (as [`crate::save::write_base`] writes), a sharded one, or the
    /// `model.gguf` of a GGUF model view ([`crate::base::stage_base`]), dequantized.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, TrainError> {
        let shape = read_config(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let mut params = ParamStore::new(dtype, device.clone());
        for (name, dims) in shape.weight_shapes() {
            params.insert(&name, ckpt.tensor(&name, &dims, dtype, device)?)?;
        }
        Self::from_params(shape, params)
    }

    fn from_params(shape: ModelConfig, params: ParamStore) -> Result<Self, TrainError> {
        let layers = (0..shape.num_hidden_layers)
            .map(|l| {
                let p = |n: &str| params.get(&format!("model.layers.{l}.{n}.weight"));
                Ok(Layer {
                    input_norm: p("input_layernorm")?,
                    q: p("self_attn.q_proj")?,
                    k: p("self_attn.k_proj")?,
                    v: p("self_attn.v_proj")?,
                    o: p("self_attn.o_proj")?,
                    post_norm: p("post_attention_layernorm")?,
                    gate: p("mlp.gate_proj")?,
                    up: p("mlp.up_proj")?,
                    down: p("mlp.down_proj")?,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let embed = params.get("model.embed_tokens.weight")?;
        let lm_head = if shape.tie_word_embeddings {
            embed.clone()
        } else {
            params.get("lm_head.weight")?
        };
        let inv_freq = rope_inv_freq(&shape);
        Ok(Self {
            norm: params.get("model.norm.weight")?,
            shape,
            params,
            embed,
            layers,
            lm_head,
            inv_freq,
        })
    }

    /// The same model with every weight detached from autograd: a frozen base whose forward
    /// builds no graph through its weights (LoRA training), sharing their storage.
    pub fn frozen(&self) -> Self {
        let d = |t: &Tensor| t.detach();
        Self {
            shape: self.shape.clone(),
            params: self.params.clone(),
            embed: d(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_norm: d(&l.input_norm),
                    q: d(&l.q),
                    k: d(&l.k),
                    v: d(&l.v),
                    o: d(&l.o),
                    post_norm: d(&l.post_norm),
                    gate: d(&l.gate),
                    up: d(&l.up),
                    down: d(&l.down),
                })
                .collect(),
            norm: d(&self.norm),
            lm_head: d(&self.lm_head),
            inv_freq: self.inv_freq.clone(),
        }
    }

    /// The architecture.
    pub fn shape(&self) -> &ModelConfig {
        &self.shape
    }

    /// The weights, by Hugging Face name.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Logits `[batch, time, vocab]` for token ids `[batch, time]` (u32).
    pub fn forward(
        &self,
        ids: &Tensor,
        mut opts: ForwardOptions<'_>,
    ) -> Result<Tensor, TrainError> {
        let (b, t) = ids.dims2()?;
        let dtype = self.params.dtype();
        let device = self.params.device();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        let rope = self.rope_tables(t, dtype, device)?;
        let mask = causal_mask(t, dtype, device)?;
        let eps = self.shape.rms_norm_eps;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let a = self.attention(l, layer, &h, (b, t), &rope, &mask, &mut opts)?;
            x = (x + a)?;
            let h = rms_norm(&x, &layer.post_norm, eps)?;
            let gate = project(&h, &layer.gate, l, Target::Gate, &mut opts)?;
            let up = project(&h, &layer.up, l, Target::Up, &mut opts)?;
            let act = (gate.silu()? * up)?;
            x = (x + project(&act, &layer.down, l, Target::Down, &mut opts)?)?;
        }
        let logits = rms_norm(&x, &self.norm, eps)?.matmul(&self.lm_head.t()?)?;
        Ok(logits.reshape((b, t, self.shape.vocab_size))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        (b, t): (usize, usize),
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor, TrainError> {
        let s = &self.shape;
        let (heads, kv_heads, d) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim);
        let split = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(project(h, &layer.q, l, Target::Q, opts)?, heads)?;
        let k = split(project(h, &layer.k, l, Target::K, opts)?, kv_heads)?;
        let v = split(project(h, &layer.v, l, Target::V, opts)?, kv_heads)?;
        let (q, k) = (apply_rope(&q, rope)?, apply_rope(&k, rope)?);
        let (k, v) = (
            repeat_kv(&k, heads / kv_heads)?,
            repeat_kv(&v, heads / kv_heads)?,
        );
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let y = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * t, heads * d))?;
        project(&y, &layer.o, l, Target::O, opts)
    }

    /// cos and sin `[time, head_dim]` in transformers' layout (the half-size angle table repeated
    /// twice along the last axis), angles computed in f32.
    fn rope_tables(
        &self,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(t * 2 * half);
        for p in 0..t {
            for _ in 0..2 {
                angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
            }
        }
        let a = Tensor::from_vec(angles, (t, 2 * half), device)?;
        Ok((a.cos()?.to_dtype(dtype)?, a.sin()?.to_dtype(dtype)?))
    }
}

/// `x Wᵀ` for `x: [rows, in]`, `W: [out, in]`, plus the adapter's `scale · B A dropout(x)`.
fn project(
    x: &Tensor,
    w: &Tensor,
    layer: usize,
    target: Target,
    opts: &mut ForwardOptions<'_>,
) -> Result<Tensor, TrainError> {
    let y = x.matmul(&w.t()?)?;
    let delta = opts
        .lora
        .and_then(|set| set.delta(layer, target, x, opts.dropout.as_deref_mut()));
    let y = match delta {
        Some(delta) => (y + delta?)?,
        None => y,
    };
    match opts
        .frozen
        .and_then(|set| set.delta(layer, target, x, None))
    {
        Some(delta) => Ok((y + delta?)?),
        None => Ok(y),
    }
}

/// transformers' `LlamaRMSNorm`: `w * x / sqrt(mean(x²) + eps)` over the last axis.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last axis (the max is a constant shift: detached, no gradient through it).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last axis (max detached like [`softmax_last`]).
pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let z = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `x·cos + rotate_half(x)·sin` for `x: [batch, heads, time, head_dim]`.
fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// transformers' `repeat_kv`: key/value head `i` serves query heads `i·n .. (i+1)·n`.
fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

/// `[time, time]`: 0 where a query may see a key (key ≤ query), −∞ elsewhere.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (t, t), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::lora::{LoraConfig, LoraSet};
    use crate::loss::{masked_cross_entropy, scalar};
    use medley_shard::model::LlamaDims;

    /// Autograd against central finite differences, in f64, for a few entries of every kind of
    /// weight (embedding, norms, attention, MLP, lm_head) and of LoRA `B`, on a tiny GQA shape.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let shape = ModelConfig::llama(LlamaDims {
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
        });
        let init = InitConfig { seed: 5, std: 0.5 };
        let model = Llama::init(&shape, init, DType::F64, &dev).unwrap();
        let lora_cfg = LoraConfig {
            rank: 2,
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let lora = LoraSet::init(&shape, &lora_cfg, DType::F64, &dev).unwrap();
        // Non-zero B so that the gradient reaches A too.
        for (name, var) in lora.params().iter() {
            if name.contains("lora_B") {
                let v = crate::params::draw(9, name, var.elem_count(), Init::Normal(0.3)).unwrap();
                let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                var.set(&t.to_dtype(DType::F64).unwrap()).unwrap();
            }
        }
        let seqs = [
            crate::Sequence::all(vec![1, 4, 2, 9, 3, 3]),
            crate::Sequence::prompt_completion(&[5, 6], &[7, 10]),
        ];
        let refs: Vec<_> = seqs.iter().collect();
        let batch = crate::Batch::new(&refs, 16, 0, DType::F64, &dev).unwrap();
        let loss = || {
            let opts = ForwardOptions {
                lora: Some(&lora),
                dropout: None,
                frozen: None,
            };
            let logits = model.forward(&batch.ids, opts).unwrap();
            masked_cross_entropy(&logits, &batch.targets, &batch.weights, batch.num_targets)
                .unwrap()
        };
        let grads = loss().backward().unwrap();
        let checks = [
            (model.params(), "model.embed_tokens.weight", 9),
            (model.params(), "model.layers.0.input_layernorm.weight", 3),
            (model.params(), "model.layers.0.self_attn.q_proj.weight", 17),
            (model.params(), "model.layers.1.self_attn.k_proj.weight", 5),
            (model.params(), "model.layers.0.self_attn.v_proj.weight", 30),
            (model.params(), "model.layers.1.self_attn.o_proj.weight", 12),
            (model.params(), "model.layers.0.mlp.gate_proj.weight", 40),
            (model.params(), "model.layers.1.mlp.down_proj.weight", 7),
            (model.params(), "model.norm.weight", 2),
            (model.params(), "lm_head.weight", 50),
            (
                lora.params(),
                "model.layers.0.self_attn.q_proj.lora_A.weight",
                3,
            ),
            (lora.params(), "model.layers.1.mlp.up_proj.lora_B.weight", 4),
        ];
        let h = 1e-5;
        for (store, name, i) in checks {
            let var = store.var(name).unwrap();
            let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let analytic = analytic.to_vec1::<f64>().unwrap()[i];
            let orig = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
                scalar(&loss()).unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            at(0.0);
            let tol = 1e-6 + 1e-4 * numeric.abs();
            assert!(
                (analytic - numeric).abs() <= tol,
                "{name}[{i}]: autograd {analytic} vs finite difference {numeric}"
            );
        }
    }
}
