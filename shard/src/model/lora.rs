//! The hook through which LoRA adapters add their low-rank deltas to the base projections.
//!
//! The model calls [`LoraDelta::apply`] right after each of the seven projections of every layer
//! with the projection's input, its base output and the adapter slot of every row of the ragged
//! batch. The adapter runtime implements the trait; [`NoLora`] serves the base model.

use candle_core::Tensor;

/// A projection of a decoder layer that a LoRA adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl TargetModule {
    /// All modules in the order the forward pass applies them.
    pub const ALL: [TargetModule; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The PEFT `target_modules` name (`q_proj`, ..., `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// Parses a PEFT module name (the inverse of [`TargetModule::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }
}

/// Adds LoRA contributions to the output of a base projection.
pub trait LoraDelta: Send + Sync {
    /// Returns `y` plus the LoRA contribution of `module` in `layer` for every row whose slot is
    /// non-zero. `x`: `[rows, in]` input of the projection, `y`: `[rows, out]` base output (both in
    /// the model's compute dtype), `row_slots[i]` = adapter slot of row `i`.
    fn apply(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        y: Tensor,
        row_slots: &[u32],
    ) -> candle_core::Result<Tensor>;
}

/// The base model: every projection output is returned unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLora;

impl LoraDelta for NoLora {
    fn apply(
        &self,
        _layer: usize,
        _module: TargetModule,
        _x: &Tensor,
        y: Tensor,
        _row_slots: &[u32],
    ) -> candle_core::Result<Tensor> {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in TargetModule::ALL {
            assert_eq!(TargetModule::from_name(m.name()), Some(m));
            assert!(m.path().ends_with(m.name()));
        }
        assert_eq!(TargetModule::from_name("lm_head"), None);
    }
}
