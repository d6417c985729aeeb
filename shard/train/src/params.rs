//! Named trainable tensors ([`ParamStore`]): seeded initialisation, safetensors save and load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::TrainError;

/// How a parameter's initial values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All ones (RMSNorm weights).
    Ones,
    /// All zeros (LoRA `B`).
    Zeros,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Uniform on `[-bound, bound]` (PEFT's Kaiming-uniform `A`).
    Uniform(f64),
}

/// A seeded ChaCha stream of its own for each `(seed, name)`, so a tensor's values do not depend
/// on the order in which tensors are created.
pub fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a of the name, mixed with the seed.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    ChaCha8Rng::seed_from_u64(seed ^ h.rotate_left(17))
}

/// Draws `n` values of `init` from the stream of `(seed, name)`.
pub fn draw(seed: u64, name: &str, n: usize, init: Init) -> Result<Vec<f32>, TrainError> {
    let mut rng = stream(seed, name);
    Ok(match init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Normal(std) => {
            let d = Normal::new(0.0, std)
                .map_err(|e| TrainError::Config(format!("init std {std}: {e}")))?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
        Init::Uniform(bound) => {
            let d = rand_distr::Uniform::new_inclusive(-bound, bound)
                .map_err(|e| TrainError::Config(format!("init bound {bound}: {e}")))?;
            (0..n).map(|_| d.sample(&mut rng) as f32).collect()
        }
    })
}

/// Trainable tensors by name, in name order (the order the optimiser and the gradient norm
/// visit them, so runs are reproducible).
#[derive(Debug, Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    dtype: DType,
    device: Device,
}

impl ParamStore {
    /// An empty store whose tensors will have `dtype` on `device`.
    pub fn new(dtype: DType, device: Device) -> Self {
        Self {
            vars: BTreeMap::new(),
            dtype,
            device,
        }
    }

    /// Creates `name` with `shape`, drawn from `init` with the stream of `(seed, name)`.
    pub fn init(
        &mut self,
        seed: u64,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> Result<Tensor, TrainError> {
        let n = shape.iter().product();
        let values = draw(seed, name, n, init)?;
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        self.insert(name, t)
    }

    /// Adds `value` as the trainable tensor `name` (converted to the store's dtype) and returns
    /// the tensor the forward uses.
    pub fn insert(&mut self, name: &str, value: Tensor) -> Result<Tensor, TrainError> {
        let var = Var::from_tensor(&value.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        let t = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(t)
    }

    /// The tensor `name`.
    pub fn get(&self, name: &str) -> Result<Tensor, TrainError> {
        self.vars
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| TrainError::Config(format!("no parameter `{name}`")))
    }

    /// The variable `name` (to overwrite its values).
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// Every `(name, variable)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when the store holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The dtype of the tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the tensors.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies of the current values (own storage, unaffected by later updates), by name,
    /// converted to `dtype`.
    pub fn snapshot(&self, dtype: DType) -> Result<HashMap<String, Tensor>, TrainError> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_dtype(dtype)?.copy()?)))
            .collect()
    }

    /// Writes every tensor to a safetensors file, converted to `dtype`.
    pub fn save_safetensors(&self, path: &Path, dtype: DType) -> Result<(), TrainError> {
        candle_core::safetensors::save(&self.snapshot(dtype)?, path)?;
        Ok(())
    }

    /// Overwrites the values of the tensors named in a safetensors file; every tensor of the
    /// store must be present there with its shape (extra tensors in the file are an error too).
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), TrainError> {
        let loaded = candle_core::safetensors::load(path, &self.device)?;
        self.load_tensors(loaded, &path.display().to_string())
    }

    /// Overwrites the values of the tensors in `loaded` (from `source`, for errors); every
    /// tensor of the store must be there with its shape, and nothing else.
    pub fn load_tensors(
        &self,
        mut loaded: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<(), TrainError> {
        for (name, var) in &self.vars {
            let t = loaded
                .remove(name)
                .ok_or_else(|| TrainError::Config(format!("{source} has no tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(TrainError::Config(format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        if let Some(extra) = loaded.keys().next() {
            return Err(TrainError::Config(format!(
                "{source} has an unexpected tensor `{extra}`"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seeded_by_name_and_round_trips() {
        let a = draw(1, "x", 8, Init::Normal(1.0)).unwrap();
        assert_eq!(a, draw(1, "x", 8, Init::Normal(1.0)).unwrap());
        assert_ne!(a, draw(1, "y", 8, Init::Normal(1.0)).unwrap());
        assert_ne!(a, draw(2, "x", 8, Init::Normal(1.0)).unwrap());
        let mut s = ParamStore::new(DType::F32, Device::Cpu);
        s.init(3, "w", &[2, 3], Init::Uniform(0.5)).unwrap();
        s.init(3, "n", &[3], Init::Ones).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        s.save_safetensors(&path, DType::F32).unwrap();
        let mut t = ParamStore::new(DType::F32, Device::Cpu);
        t.init(9, "w", &[2, 3], Init::Zeros).unwrap();
        t.init(9, "n", &[3], Init::Zeros).unwrap();
        t.load_safetensors(&path).unwrap();
        for name in ["w", "n"] {
            let (x, y) = (s.get(name).unwrap(), t.get(name).unwrap());
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}
