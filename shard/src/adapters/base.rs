//! The base model's LoRA-able projections: their shapes, and the mapping of PEFT module paths
//! (`model.layers.{i}.self_attn.q_proj`, ...) to `(layer, TargetModule)`.

use std::collections::BTreeMap;
use std::ops::Range;

use medley_merge::LoraAdapter;

use super::AdapterError;
use crate::model::{LocalShape, ModelConfig, TargetModule};

/// `(out, in)` of every projection of every decoder layer of the base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModules {
    layers: usize,
    shapes: [(usize, usize); 7],
    /// The `(out, in)` ranges of every projection this rank holds (all of it unless
    /// tensor-parallel; see [`BaseModules::split`]).
    parts: [(Range<usize>, Range<usize>); 7],
    by_path: BTreeMap<String, (usize, usize)>,
}

impl BaseModules {
    /// The projections of a Llama-family model: q `(heads·d, hidden)`, k/v `(kv_heads·d, hidden)`,
    /// o `(hidden, heads·d)`, gate/up `(intermediate, hidden)`, down `(hidden, intermediate)`.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_size(), cfg.kv_size());
        let shapes = TargetModule::ALL.map(|m| match m {
            TargetModule::Q => (q, h),
            TargetModule::K | TargetModule::V => (kv, h),
            TargetModule::O => (h, q),
            TargetModule::Gate | TargetModule::Up => (i, h),
            TargetModule::Down => (h, i),
        });
        let mut by_path = BTreeMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for (m, shape) in TargetModule::ALL.into_iter().zip(shapes) {
                by_path.insert(module_path(layer, m), shape);
            }
        }
        Self {
            layers: cfg.num_hidden_layers,
            parts: shapes.map(|(out, inp)| (0..out, 0..inp)),
            shapes,
            by_path,
        }
    }

    /// The same projections as held by one tensor-parallel rank: q/k/v/gate/up keep the rows
    /// (output features) of `local`, o/down its columns (input features). Adapter files are still
    /// checked against the whole shapes; [`BaseModules::part`] says what a rank uploads.
    pub fn split(mut self, local: &LocalShape) -> Self {
        for m in TargetModule::ALL {
            let (out, inp) = self.shape(m);
            self.parts[module_index(m)] = match m {
                TargetModule::Q => (local.q_rows.clone(), 0..inp),
                TargetModule::K | TargetModule::V => (local.kv_rows.clone(), 0..inp),
                TargetModule::Gate | TargetModule::Up => (local.mlp_rows.clone(), 0..inp),
                TargetModule::O => (0..out, local.q_rows.clone()),
                TargetModule::Down => (0..out, local.mlp_rows.clone()),
            };
        }
        self
    }

    /// The `(out, in)` ranges of `module` this rank holds.
    pub fn part(&self, module: TargetModule) -> (Range<usize>, Range<usize>) {
        self.parts[module_index(module)].clone()
    }

    /// Number of decoder layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// `(out, in)` of `module`.
    pub fn shape(&self, module: TargetModule) -> (usize, usize) {
        self.shapes[module_index(module)]
    }

    /// The layer and projection of a PEFT module path; a clear error for modules Medley cannot
    /// apply LoRA to (`lm_head`, `embed_tokens`, ...) or layers the model does not have.
    pub fn locate(&self, path: &str) -> Result<(usize, TargetModule), AdapterError> {
        let parsed = (|| {
            let (layer, rest) = path.strip_prefix("model.layers.")?.split_once('.')?;
            if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let module = TargetModule::ALL.into_iter().find(|m| m.path() == rest)?;
            Some((layer.parse::<usize>().ok()?, module))
        })();
        match parsed {
            Some((layer, module)) if layer < self.layers => Ok((layer, module)),
            Some((layer, _)) => Err(AdapterError::Invalid(format!(
                "adapter module {path} does not exist: the base model has {} layers (0..{}), not layer {layer}; the adapter was trained for another base model",
                self.layers,
                self.layers.saturating_sub(1)
            ))),
            None => Err(AdapterError::Invalid(format!(
                "adapter module {path} is not supported: Medley applies LoRA to the q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj projections of the decoder layers only"
            ))),
        }
    }

    /// Checks that every module of `adapter` (named `id` in messages) exists in the base model
    /// with the same shape.
    pub fn check(&self, id: &str, adapter: &LoraAdapter) -> Result<(), AdapterError> {
        for path in adapter.modules().keys() {
            self.locate(path)
                .map_err(|e| AdapterError::Invalid(format!("adapter {id}: {e}")))?;
        }
        adapter
            .check_base_shapes(&self.by_path)
            .map_err(|e| AdapterError::Invalid(format!("adapter {id}: {e}")))
    }
}

/// `model.layers.{layer}.{self_attn|mlp}.{name}`.
pub fn module_path(layer: usize, module: TargetModule) -> String {
    format!("model.layers.{layer}.{}", module.path())
}

/// Position of `module` in [`TargetModule::ALL`].
pub fn module_index(module: TargetModule) -> usize {
    match module {
        TargetModule::Q => 0,
        TargetModule::K => 1,
        TargetModule::V => 2,
        TargetModule::O => 3,
        TargetModule::Gate => 4,
        TargetModule::Up => 5,
        TargetModule::Down => 6,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The committed tiny fixture's config (hidden 64, intermediate 176, 2 layers, 4/2 heads of 16).
    pub(crate) fn tiny_config() -> ModelConfig {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        ModelConfig::from_file(&dir.join("config.json")).expect("fixture config")
    }

    #[test]
    fn a_rank_holds_rows_of_output_split_and_columns_of_input_split_projections() {
        let cfg = tiny_config();
        let whole = BaseModules::from_config(&cfg);
        assert_eq!(whole.part(TargetModule::Q), (0..64, 0..64));
        let local = crate::model::TpLayout::new(1, 2)
            .and_then(|t| t.split(&cfg))
            .expect("split");
        let half = whole.clone().split(&local);
        assert_eq!(
            half.shape(TargetModule::Q),
            (64, 64),
            "files keep the whole shape"
        );
        assert_eq!(half.part(TargetModule::Q), (32..64, 0..64));
        assert_eq!(half.part(TargetModule::K), (16..32, 0..64));
        assert_eq!(half.part(TargetModule::Up), (88..176, 0..64));
        assert_eq!(half.part(TargetModule::O), (0..64, 32..64));
        assert_eq!(half.part(TargetModule::Down), (0..64, 88..176));
    }

    #[test]
    fn shapes_and_paths() {
        let base = BaseModules::from_config(&tiny_config());
        assert_eq!(base.layers(), 2);
        assert_eq!(base.shape(TargetModule::Q), (64, 64));
        assert_eq!(base.shape(TargetModule::K), (32, 64));
        assert_eq!(base.shape(TargetModule::O), (64, 64));
        assert_eq!(base.shape(TargetModule::Up), (176, 64));
        assert_eq!(base.shape(TargetModule::Down), (64, 176));
        for (i, m) in TargetModule::ALL.into_iter().enumerate() {
            assert_eq!(module_index(m), i);
            assert_eq!(base.locate(&module_path(1, m)).expect("known"), (1, m));
        }
    }

    #[test]
    fn unsupported_and_foreign_modules_are_explained() {
        let base = BaseModules::from_config(&tiny_config());
        for path in [
            "lm_head",
            "model.embed_tokens",
            "model.layers.0.self_attn.gate_proj",
            "model.layers.0.mlp.q_proj",
            "model.layers.x.self_attn.q_proj",
            "model.layers.+1.self_attn.q_proj",
            "model.layers.0.self_attn.q_proj.extra",
        ] {
            let msg = base.locate(path).expect_err(path).to_string();
            assert!(msg.contains(path) && msg.contains("not supported"), "{msg}");
        }
        let msg = base
            .locate("model.layers.2.mlp.down_proj")
            .expect_err("layer 2")
            .to_string();
        assert!(
            msg.contains("2 layers") && msg.contains("another base model"),
            "{msg}"
        );
    }
}
