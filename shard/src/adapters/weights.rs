//! The weights of one adapter slot, in the layout the batched kernels use: per `(layer, module)`
//! `A` as `[r, in]` and `scale · Bᵀ` as `[r, out]`, first on the host ([`SlotWeights`], hashed),
//! then on the model's device ([`SlotAdapter`]).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use medley_merge::{LoraAdapter, Matrix, MergedAdapter};
use sha2::{Digest, Sha256};

use super::AdapterError;
use super::base::{BaseModules, module_index};
use crate::model::TargetModule;
use crate::model::error_text::Plain;

/// The dtype adapter factors are stored and multiplied in: f32 on every device and for every
/// compute dtype. That is PEFT's arithmetic for half-precision models (`autocast_adapter_dtype`,
/// its default, keeps adapter weights in f32; the input is widened, the LoRA term computed in f32
/// and added to the base layer's half-precision output before one rounding), which Medley's
/// outputs are checked against; it costs twice the adapter memory of half-precision factors, and
/// LoRA's matmuls are small beside the base model's.
pub const LORA_DTYPE: DType = DType::F32;

/// One module's factors on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostModule {
    /// The rank.
    pub rank: usize,
    /// `A`, `[rank, in]` row-major.
    pub a: Vec<f32>,
    /// `scale · Bᵀ`, `[rank, out]` row-major.
    pub b_t: Vec<f32>,
}

/// A slot's weights on the host, keyed by `(layer, module)`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SlotWeights {
    modules: BTreeMap<(usize, TargetModule), HostModule>,
}

impl SlotWeights {
    /// A single adapter with its per-module scales (`alpha/r`, rsLoRA and patterns applied).
    /// Its modules must have been checked against `base`.
    pub fn from_adapter(adapter: &LoraAdapter, base: &BaseModules) -> Result<Self, AdapterError> {
        let mut modules = BTreeMap::new();
        for (path, m) in adapter.modules() {
            let key = base.locate(path)?;
            modules.insert(key, host_module(m.a(), m.b(), m.scale()));
        }
        Ok(Self { modules })
    }

    /// A merge result, with its global scale (1 in PEFT semantics).
    pub fn from_merged(merged: &MergedAdapter, base: &BaseModules) -> Result<Self, AdapterError> {
        let mut modules = BTreeMap::new();
        for (path, m) in &merged.modules {
            let key = base.locate(path)?;
            modules.insert(key, host_module(&m.a, &m.b, merged.scale));
        }
        Ok(Self { modules })
    }

    /// The largest module rank.
    pub fn rank(&self) -> usize {
        self.modules.values().map(|m| m.rank).max().unwrap_or(0)
    }

    /// The modules.
    pub fn modules(&self) -> &BTreeMap<(usize, TargetModule), HostModule> {
        &self.modules
    }

    /// Lower-case hex SHA-256 over every module's position, shape and f32 bit patterns: equal
    /// hashes mean bit-identical slot weights.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"medley-slot-weights/v1\0");
        for ((layer, module), m) in &self.modules {
            h.update((*layer as u64).to_le_bytes());
            h.update(module.name().as_bytes());
            h.update([0]);
            for side in [&m.a, &m.b_t] {
                h.update((m.rank as u64).to_le_bytes());
                h.update((side.len() as u64).to_le_bytes());
                for v in side {
                    h.update(v.to_bits().to_le_bytes());
                }
            }
        }
        hex::encode(h.finalize())
    }

    /// Copies this rank's part of the factors (see [`BaseModules::part`]) to `device`, in
    /// [`LORA_DTYPE`].
    pub fn to_device(
        &self,
        base: &BaseModules,
        device: &Device,
    ) -> Result<SlotAdapter, AdapterError> {
        let dtype = LORA_DTYPE;
        let mut layers: Vec<[Option<DeviceModule>; 7]> =
            (0..base.layers()).map(|_| Default::default()).collect();
        let mut bytes = 0u64;
        let internal = |e: candle_core::Error| {
            AdapterError::Internal(format!("adapter upload: {}", Plain(&e)))
        };
        for ((layer, module), m) in &self.modules {
            // A tensor-parallel rank takes the columns of A (input features) and of Bᵀ (output
            // features) its part of the projection has: for output-split layers A is whole and
            // B split, for input-split layers A split and B whole.
            let (out, inp) = base.shape(*module);
            let (out_part, in_part) = base.part(*module);
            let a = columns(&m.a, m.rank, inp, &in_part);
            let b_t = columns(&m.b_t, m.rank, out, &out_part);
            bytes += ((a.len() + b_t.len()) * dtype.size_in_bytes()) as u64;
            let a = Tensor::from_slice(&a, (m.rank, in_part.len()), device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(internal)?;
            let b_t = Tensor::from_slice(&b_t, (m.rank, out_part.len()), device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(internal)?;
            let entry = layers
                .get_mut(*layer)
                .ok_or_else(|| AdapterError::Internal(format!("layer {layer} out of range")))?;
            entry[module_index(*module)] = Some(DeviceModule {
                rank: m.rank,
                a,
                b_t,
            });
        }
        // Uploads run on merge threads; on CUDA each thread has its own stream, so wait for the
        // copies here rather than let the engine thread's stream race them.
        device.synchronize().map_err(internal)?;
        Ok(SlotAdapter {
            serial: next_serial(),
            layers,
            bytes,
            rank: self.rank() as u32,
            content_hash: self.content_hash(),
        })
    }
}

/// Columns `part` of the row-major `[rows, cols]` matrix `m` (borrowed when that is all of it).
fn columns<'a>(
    m: &'a [f32],
    rows: usize,
    cols: usize,
    part: &std::ops::Range<usize>,
) -> std::borrow::Cow<'a, [f32]> {
    if *part == (0..cols) {
        return m.into();
    }
    let mut out = Vec::with_capacity(rows * part.len());
    for row in m.chunks_exact(cols.max(1)).take(rows) {
        out.extend_from_slice(&row[part.clone()]);
    }
    out.into()
}

/// `A` as is, `Bᵀ` scaled (the product in f64, rounded once).
fn host_module(a: &Matrix, b: &Matrix, scale: f64) -> HostModule {
    let (out, rank) = b.shape();
    let mut b_t = vec![0f32; rank * out];
    for (o, row) in b.data().chunks_exact(rank.max(1)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            b_t[j * out + o] = (v as f64 * scale) as f32;
        }
    }
    HostModule {
        rank,
        a: a.data().to_vec(),
        b_t,
    }
}

/// One module's factors on the device.
#[derive(Debug, Clone)]
pub struct DeviceModule {
    /// The rank.
    pub rank: usize,
    /// `A`, `[rank, in]`.
    pub a: Tensor,
    /// `scale · Bᵀ`, `[rank, out]`.
    pub b_t: Tensor,
}

/// An adapter ready to serve from a slot.
#[derive(Debug, Clone)]
pub struct SlotAdapter {
    /// Unique to these device tensors in this process (clones share them, and it).
    serial: u64,
    layers: Vec<[Option<DeviceModule>; 7]>,
    bytes: u64,
    rank: u32,
    content_hash: String,
}

/// The serial of the next [`SlotAdapter`] made.
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl SlotAdapter {
    /// A number no other upload of adapter factors in this process has: what a CUDA graph that
    /// reads these factors is recorded for (an adapter evicted and loaded again gets another).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The factors of `module` in `layer`, if the adapter has them.
    pub fn module(&self, layer: usize, module: TargetModule) -> Option<&DeviceModule> {
        self.layers.get(layer)?[module_index(module)].as_ref()
    }

    /// Bytes of the device tensors.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The largest module rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// See [`SlotWeights::content_hash`].
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::base::tests::tiny_config;
    use medley_merge::fixture::{AdapterFixture, LlamaShape};

    #[test]
    fn factors_are_transposed_scaled_and_hashed() {
        let base = BaseModules::from_config(&tiny_config());
        let shapes = LlamaShape::tiny().module_shapes();
        let mut fx = AdapterFixture::new(4, 7);
        fx.targets = vec!["q_proj".into(), "down_proj".into()];
        fx.alpha = 12.0;
        let adapter = fx.adapter(&shapes).expect("fixture");
        let w = SlotWeights::from_adapter(&adapter, &base).expect("weights");
        assert_eq!(w.modules().len(), 4);
        assert_eq!(w.rank(), 4);
        let src = &adapter.modules()["model.layers.1.mlp.down_proj"];
        let m = &w.modules()[&(1, TargetModule::Down)];
        assert_eq!(m.a, src.a().data());
        // Bᵀ[j, o] = 3 · B[o, j] (alpha 12 / r 4), exact for this power-of-two-free scale in f64.
        let (out, r) = src.b().shape();
        for o in [0, 5, out - 1] {
            for j in 0..r {
                let want = (src.b().data()[o * r + j] as f64 * 3.0) as f32;
                assert_eq!(m.b_t[j * out + o], want);
            }
        }
        let dev = w.to_device(&base, &Device::Cpu).expect("upload");
        assert_eq!(dev.bytes(), 4 * (4 * 64 + 4 * 64 + 4 * 176 + 4 * 64) * 2);
        assert_eq!(dev.content_hash(), w.content_hash());
        assert_eq!(
            dev.module(1, TargetModule::Down).expect("down").b_t.dims(),
            &[4, 64]
        );
        assert!(dev.module(0, TargetModule::K).is_none());
        assert!(dev.module(5, TargetModule::Q).is_none());
        // Any change of a value changes the hash.
        let mut other = w.clone();
        if let Some(m) = other.modules.get_mut(&(0, TargetModule::Q)) {
            m.a[3] = f32::from_bits(m.a[3].to_bits() ^ 1);
        }
        assert_ne!(other.content_hash(), w.content_hash());
    }
}
