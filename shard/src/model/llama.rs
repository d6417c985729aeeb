//! The Llama decoder: loading from a Hugging Face checkpoint and the batched forward step.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::attention::{self, Attention, AttentionStep, AttentionWeights, Rope, RopeTable};
use super::batch::{BatchPlan, ForwardBatch};
use super::embedding::{Embedding, EmbeddingSpec};
use super::layers::{Linear, Projections, RmsNorm, silu_mul};
use super::lora::{LoraDelta, RowSlots, TargetModule};
use super::quant::{Quantize, quantize_weight};
use super::vocab;
use super::weights::{Checkpoint, Part};
use super::{LoadOptions, LocalShape, ModelConfig, ModelError};
use crate::comm::{Comm, Timed};
use crate::kv_cache::KvCache;

/// The SiLU-gated MLP of one decoder layer.
#[derive(Debug, Clone)]
struct Mlp {
    /// gate and up, stacked into one matmul when asked (see [`Projections`]).
    gate_up: Projections,
    down: Linear,
}

impl Mlp {
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        lora: &dyn LoraDelta,
        slots: &RowSlots,
    ) -> candle_core::Result<Tensor> {
        let modules = [TargetModule::Gate, TargetModule::Up];
        let [gate, up] = self.gate_up.forward_lora(x, layer, modules, lora, slots)?;
        let act = silu_mul(&gate, &up)?;
        lora.apply(
            layer,
            TargetModule::Down,
            &act,
            self.down.forward(&act)?,
            slots,
        )
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model ready to run forward steps.
#[derive(Debug)]
pub struct LlamaModel {
    cfg: ModelConfig,
    /// `cfg` with this rank's head counts (see [`LlamaModel::kv_config`]).
    kv_cfg: ModelConfig,
    /// The part of every layer this rank holds.
    local: LocalShape,
    dtype: DType,
    device: Device,
    /// The collectives of this rank's tensor-parallel group, timed.
    comm: Arc<Timed>,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    /// The rotary tables of every position a request may reach, on a GPU at world size 1 with a
    /// dense embedding ([`LlamaModel::build_rope_table`]): steps then read their token ids and
    /// positions on the device ([`StepInputs`]).
    rope_table: Option<RopeTable>,
}

/// A step's token ids and positions (`[rows]` u32 each) on the device.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DeviceIds {
    pub ids: Tensor,
    pub positions: Tensor,
}

/// What a step reads besides the activations: its ids and positions on the device (`None`: the
/// lookup and the rotary tables take them from the plan on the host) and the paged attention's
/// index (the CUDA kernels). A CUDA graph replays a step over its own, rewritten in place.
#[derive(Default)]
pub(crate) struct StepInputs {
    pub ids: Option<DeviceIds>,
    pub gpu: Option<attention::GpuIndex>,
}

impl LlamaModel {
    /// Loads `config.json` and the safetensors weights of `model_dir`.
    pub fn load(model_dir: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
        let dtype = opts.dtype.unwrap_or(cfg.torch_dtype);
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::Unsupported(format!("compute dtype {dtype:?}")));
        }
        let ckpt = Checkpoint::open(model_dir)?;
        let model = Self::from_checkpoint(cfg, &ckpt, dtype, opts)?;
        tracing::info!(
            dir = %model_dir.display(),
            files = ckpt.files().len(),
            layers = model.cfg.num_hidden_layers,
            hidden = model.cfg.hidden_size,
            ?dtype,
            quantize = ?opts.quantize.resolve(ckpt.is_gguf(), &opts.device),
            projection_mib = model.projection_bytes() >> 20,
            device = ?opts.device,
            rank = opts.tp.rank,
            world = opts.tp.world,
            "loaded llama model"
        );
        Ok(model)
    }

    fn from_checkpoint(
        cfg: ModelConfig,
        ckpt: &Checkpoint,
        dtype: DType,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let device = &opts.device;
        let local = opts.tp.split(&cfg)?;
        if opts.comm.world_size() != opts.tp.world || opts.comm.rank() != opts.tp.rank {
            return Err(ModelError::InvalidConfig(format!(
                "rank {} of {} with a communicator for rank {} of {}",
                opts.tp.rank,
                opts.tp.world,
                opts.comm.rank(),
                opts.comm.world_size()
            )));
        }
        let get = |name: &str, shape: &[usize]| ckpt.tensor(name, shape, dtype, device);
        let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (qs, kvs) = (cfg.q_size(), cfg.kv_size());
        let quantize = opts.quantize.resolve(ckpt.is_gguf(), device);
        let linear = |name: String, shape: &[usize], part: Part| -> Result<Linear, ModelError> {
            load_linear(ckpt, &name, shape, part, dtype, device, quantize)
        };
        let norm = |name: String| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm::new(get(&name, &[hid])?, cfg.rms_norm_eps)?)
        };
        let (rows, cols) = (Part::Rows, Part::Cols);
        let vocab_rows = || rows(local.vocab_rows.clone());
        let embed = Embedding::load(EmbeddingSpec {
            ckpt,
            shape: [cfg.vocab_size, hid],
            part: vocab_rows(),
            dtype,
            device,
            quantize,
        })?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = AttentionWeights {
                q: linear(
                    format!("{p}.self_attn.q_proj.weight"),
                    &[qs, hid],
                    rows(local.q_rows.clone()),
                )?,
                k: linear(
                    format!("{p}.self_attn.k_proj.weight"),
                    &[kvs, hid],
                    rows(local.kv_rows.clone()),
                )?,
                v: linear(
                    format!("{p}.self_attn.v_proj.weight"),
                    &[kvs, hid],
                    rows(local.kv_rows.clone()),
                )?,
                o: linear(
                    format!("{p}.self_attn.o_proj.weight"),
                    &[hid, qs],
                    cols(local.q_rows.clone()),
                )?,
            };
            layers.push(DecoderLayer {
                input_norm: norm(format!("{p}.input_layernorm.weight"))?,
                attn: Attention::new(&cfg, attn, &local, opts.stack_projections)?,
                post_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up: Projections::new(
                        vec![
                            linear(
                                format!("{p}.mlp.gate_proj.weight"),
                                &[inter, hid],
                                rows(local.mlp_rows.clone()),
                            )?,
                            linear(
                                format!("{p}.mlp.up_proj.weight"),
                                &[inter, hid],
                                rows(local.mlp_rows.clone()),
                            )?,
                        ],
                        opts.stack_projections,
                    )?,
                    down: linear(
                        format!("{p}.mlp.down_proj.weight"),
                        &[hid, inter],
                        cols(local.mlp_rows.clone()),
                    )?,
                },
            });
        }
        let final_norm = norm("model.norm.weight".into())?;
        // Like transformers, tied models ignore a stored lm_head.weight.
        let lm_head = if cfg.tie_word_embeddings {
            match quantize {
                // The file's own (quantized) embedding matrix, as llama.cpp uses it: the very
                // blocks of the kept embedding when it is kept.
                Quantize::Keep => match embed.packed() {
                    Some(w) => Linear::packed(w.clone(), dtype),
                    None => linear(
                        "model.embed_tokens.weight".into(),
                        &[cfg.vocab_size, hid],
                        vocab_rows(),
                    )?,
                },
                Quantize::To(_) | Quantize::None | Quantize::Auto => {
                    let dense = embed.dense().expect("only `keep` keeps the embedding");
                    let quantized = match quantize {
                        Quantize::To(t) => quantize_weight(dense, t)?,
                        _ => None,
                    };
                    match quantized {
                        Some(q) => Linear::quantized(q, dtype)?,
                        None => Linear::new(dense.clone(), dtype)?,
                    }
                }
            }
        } else {
            linear(
                "lm_head.weight".into(),
                &[cfg.vocab_size, hid],
                vocab_rows(),
            )?
        };
        let rope = Rope::new(&cfg, device)?;
        let mut kv_cfg = cfg.clone();
        kv_cfg.num_attention_heads = local.heads;
        kv_cfg.num_key_value_heads = local.kv_heads;
        Ok(Self {
            cfg,
            kv_cfg,
            local,
            dtype,
            device: device.clone(),
            comm: Arc::new(Timed::new(opts.comm.clone())),
            embed,
            layers,
            norm: final_norm,
            lm_head,
            rope,
            rope_table: None,
        })
    }

    /// Bytes of this rank's projection weights (attention, MLP and `lm_head`; quantized or
    /// dense), what `--quantize` shrinks.
    pub fn projection_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn.weight_bytes() + l.mlp.gate_up.weight_bytes() + l.mlp.down.weight_bytes()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// The part of every layer this rank holds (all of it unless tensor-parallel); adapters are
    /// split the same way (`BaseModules::split`).
    pub fn local_shape(&self) -> &LocalShape {
        &self.local
    }

    /// The shape of this rank's KV cache: the model's, with this rank's heads (all of them
    /// unless tensor-parallel). Size the [`KvCache`] with it.
    pub fn kv_config(&self) -> &ModelConfig {
        &self.kv_cfg
    }

    /// The communicator of this rank's tensor-parallel group ([`crate::comm::Single`] alone).
    pub fn comm(&self) -> Arc<dyn Comm> {
        self.comm.clone()
    }

    /// Nanoseconds spent in collectives (waiting for the other ranks included) since the last
    /// call: the communication part of the last step.
    pub fn take_comm_ns(&self) -> u64 {
        self.comm.take_ns()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype (activations, KV cache).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One forward step over a ragged batch (prefill chunks and decode steps may be mixed).
    /// Returns f32 logits of shape `[rows, vocab_size]`: for each chunk in order, one row per
    /// token if `all_logits`, else one row (its last token).
    ///
    /// Every chunk's tokens are appended to its KV cache entry, whose length advances only when
    /// the whole step succeeded; on error nothing visible changes (blocks may have been taken;
    /// they are released with the sequence). Reserve blocks first ([`KvCache::reserve`]) to
    /// handle a full pool before the step.
    ///
    /// On the CPU the step runs inside candle's thread pool (`Device::with_context`): the many
    /// short parallel sections of a step (projections, LoRA, attention, candle's ops) then fork
    /// from a pool thread that takes part in the work, instead of waking the pool from outside
    /// and sleeping until it finishes, once per section.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        self.device
            .with_context(|| self.forward_in_pool(batch, kv, lora))
    }

    fn forward_in_pool(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        let plan = self.prepare(batch, kv)?;
        let inputs = self.upload_inputs(&plan, kv)?;
        let logits = self.compute(&plan, kv, &inputs, lora)?;
        Self::commit(&plan, kv)?;
        Ok(logits)
    }

    /// Builds the rotary table of positions `0..positions` (a request's longest) when steps can
    /// read their inputs on the device: a GPU, world size 1, a dense embedding. The table is
    /// kept by the model (`positions × head_dim` values of the compute dtype).
    pub fn build_rope_table(&mut self, positions: usize) -> Result<(), ModelError> {
        let dense = self.embed.dense().is_some();
        if !cfg!(feature = "cuda")
            || !self.device.is_cuda()
            || self.comm.world_size() != 1
            || !dense
        {
            return Ok(());
        }
        if self.rope_table.as_ref().is_none_or(|t| t.len() < positions) {
            self.rope_table = Some(self.rope.table(positions, self.dtype)?);
        }
        Ok(())
    }

    /// Positions the rotary table holds (0 without one): a step whose positions are all below
    /// reads its inputs on the device.
    pub(crate) fn device_positions(&self) -> usize {
        self.rope_table.as_ref().map_or(0, RopeTable::len)
    }

    /// The host side of a step: checks, the flattened plan, and every chunk's KV blocks
    /// reserved (see [`LlamaModel::forward`]).
    pub(crate) fn prepare(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCache,
    ) -> Result<BatchPlan, ModelError> {
        kv.check_compatible(&self.kv_cfg, self.dtype)?;
        if !kv.device().same_device(&self.device) {
            return Err(ModelError::InvalidBatch(
                "kv cache lives on another device".into(),
            ));
        }
        let plan = BatchPlan::new(batch, kv, self.cfg.vocab_size)?;
        for c in &plan.chunks {
            kv.reserve(c.seq_id, c.start + c.len)?;
        }
        Ok(plan)
    }

    /// Whether `plan`'s step reads its ids and positions on the device: the rotary table holds
    /// every one of its positions.
    pub(crate) fn reads_ids_on_device(&self, plan: &BatchPlan) -> bool {
        let positions = self.device_positions();
        positions > 0 && plan.positions.iter().all(|&p| (p as usize) < positions)
    }

    /// `plan`'s token ids and positions uploaded to the device.
    pub(crate) fn upload_ids(&self, plan: &BatchPlan) -> Result<DeviceIds, ModelError> {
        let rows = plan.num_rows();
        Ok(DeviceIds {
            ids: Tensor::from_slice(&plan.tokens, rows, &self.device)?,
            positions: Tensor::from_slice(&plan.positions, rows, &self.device)?,
        })
    }

    /// `plan`'s inputs uploaded for one step: its ids and positions when it reads them on the
    /// device, and the paged attention's index.
    pub(crate) fn upload_inputs(
        &self,
        plan: &BatchPlan,
        kv: &KvCache,
    ) -> Result<StepInputs, ModelError> {
        let ids = if self.reads_ids_on_device(plan) {
            Some(self.upload_ids(plan)?)
        } else {
            None
        };
        Ok(StepInputs {
            ids,
            gpu: attention::gpu_index(plan, kv, self.cfg.head_dim)?,
        })
    }

    /// The device side of a step: the layers over `plan` with `inputs`, writing the step's keys
    /// and values into `kv`'s reserved blocks; the logits as [`LlamaModel::forward`] returns
    /// them. Nothing on the host changes (see [`LlamaModel::commit`]).
    pub(crate) fn compute(
        &self,
        plan: &BatchPlan,
        kv: &KvCache,
        inputs: &StepInputs,
        lora: &dyn LoraDelta,
    ) -> Result<Tensor, ModelError> {
        let rows = plan.num_rows();
        let comm = self.comm.as_ref();
        let (mut x, rope) = match (&inputs.ids, &self.rope_table) {
            (Some(d), Some(table)) => self.device_lookup(d, table)?,
            _ => (
                vocab::lookup(&self.embed, &self.local.vocab_rows, &plan.tokens, comm)?,
                self.rope.tables(&plan.positions, self.dtype)?,
            ),
        };
        let step = AttentionStep {
            rope: &rope,
            plan,
            kv,
            gpu: inputs.gpu.as_ref(),
        };
        // Each residual add goes with the RMSNorm after it (one kernel on a GPU in half
        // precision): `h` is the normalised input of the next sublayer.
        let mut h = match self.layers.first() {
            Some(first) => first.input_norm.forward(&x)?,
            None => x.clone(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            // o_proj and down_proj produce this rank's partial sums (LoRA included).
            let a = layer.attn.forward(l, &h, &step, lora)?;
            let a = self.comm.all_reduce_sum_tensor(&a)?;
            (x, h) = layer.post_norm.add_forward(&x, &a)?;
            let m = layer.mlp.forward(l, &h, lora, &plan.row_slots)?;
            let m = self.comm.all_reduce_sum_tensor(&m)?;
            match self.layers.get(l + 1) {
                Some(next) => (x, h) = next.input_norm.add_forward(&x, &m)?,
                None => x = (x + m)?,
            }
        }
        // Normalise and project only the rows whose logits are returned.
        let x = if plan.logit_rows.len() == rows {
            x
        } else {
            let idx = Tensor::from_slice(&plan.logit_rows, plan.logit_rows.len(), &self.device)?;
            x.index_select(&idx, 0)?
        };
        let logits = self.lm_head.forward_f32(&self.norm.forward(&x)?)?;
        Ok(vocab::gather_logits(&logits, self.cfg.vocab_size, comm)?)
    }

    /// The embedding rows and the rotary tables of a step whose ids and positions are on the
    /// device.
    fn device_lookup(
        &self,
        d: &DeviceIds,
        table: &RopeTable,
    ) -> Result<(Tensor, attention::RopeTables), ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(embed) = self.embed.dense() {
            let x = super::gather_cuda::gather_rows(embed, &d.ids)?;
            return Ok((x, table.at(&d.positions)?));
        }
        let _ = (d, table);
        Err(ModelError::InvalidBatch(
            "step inputs on the device need a dense embedding on a GPU".into(),
        ))
    }

    /// Advances every chunk's KV entry past its tokens once its step has run.
    pub(crate) fn commit(plan: &BatchPlan, kv: &mut KvCache) -> Result<(), ModelError> {
        for c in &plan.chunks {
            kv.commit(c.seq_id, &plan.tokens[c.offset..c.offset + c.len])?;
        }
        Ok(())
    }
}

/// One projection: as stored quantized (`keep`, GGUF), quantized at load (`q8_0`, ...), or dense.
fn load_linear(
    ckpt: &Checkpoint,
    name: &str,
    shape: &[usize],
    part: Part,
    dtype: DType,
    device: &Device,
    quantize: Quantize,
) -> Result<Linear, ModelError> {
    if quantize == Quantize::Keep
        && let Some(q) = ckpt.qtensor_part(name, shape, part.clone(), device)?
    {
        return Ok(Linear::quantized(q, dtype)?);
    }
    let w = ckpt.tensor_part(name, shape, part, dtype, device)?;
    if let Quantize::To(t) = quantize
        && let Some(q) = quantize_weight(&w, t)?
    {
        return Ok(Linear::quantized(q, dtype)?);
    }
    Ok(Linear::new(w, dtype)?)
}

#[cfg(test)]
#[path = "padding_tests.rs"]
mod padding_tests;
