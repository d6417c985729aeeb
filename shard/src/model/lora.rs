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

/// A maximal run of consecutive rows of a forward step that use the same (non-base) adapter slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRun {
    /// The adapter slot (never 0).
    pub slot: u32,
    /// First row of the run.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
}

/// The adapter slot of every row of one forward step, grouped once per step (not per projection):
/// the runs of consecutive rows sharing a slot (what segmented kernels consume) and, per distinct
/// slot, its rows (what gather/scatter implementations consume). Slot 0 (the base model) appears
/// in neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowSlots {
    slots: Vec<u32>,
    runs: Vec<SlotRun>,
    groups: Vec<(u32, Vec<u32>)>,
    /// One row mapping for every LoRA call of the step ([`RowSlots::uniform`]).
    uniform: bool,
}

impl RowSlots {
    /// Groups `slots` (one per row).
    pub fn new(slots: Vec<u32>) -> Self {
        let mut runs: Vec<SlotRun> = Vec::new();
        let mut groups: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for (row, &slot) in slots.iter().enumerate() {
            if slot == 0 {
                continue;
            }
            groups.entry(slot).or_default().push(row as u32);
            match runs.last_mut() {
                Some(r) if r.slot == slot && r.start + r.len == row => r.len += 1,
                _ => runs.push(SlotRun {
                    slot,
                    start: row,
                    len: 1,
                }),
            }
        }
        Self {
            slots,
            runs,
            groups: groups.into_iter().collect(),
            uniform: false,
        }
    }

    /// The same rows, with one LoRA row mapping for every call of the step
    /// ([`RowSlots::uniform`]).
    pub fn into_uniform(mut self) -> Self {
        self.uniform = true;
        self
    }

    /// Whether every LoRA call of the step maps its rows the same way: one adapter index per
    /// row ([`LoraDelta::graph_rows`]) over every adapter the delta holds, whether or not a row
    /// uses it or it has the call's modules. A CUDA graph's step: what its kernels launch then
    /// depends on the adapters held only, and its row table is an input written before each
    /// replay. Otherwise each call takes the step's slots with its modules, as segments when
    /// rows share them.
    pub fn uniform(&self) -> bool {
        self.uniform
    }

    /// Each row's index among [`RowSlots::groups`] (its slot's place among the step's distinct
    /// slots, ascending), [`medley_kernels::NO_ADAPTER`] for the base model.
    pub fn group_indices(&self) -> Vec<u32> {
        self.slots
            .iter()
            .map(|&slot| {
                self.groups
                    .binary_search_by_key(&slot, |(s, _)| *s)
                    .map_or(medley_kernels::NO_ADAPTER, |i| i as u32)
            })
            .collect()
    }

    /// The slot of every row.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True for a step without rows.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Runs of consecutive rows with the same non-zero slot, in row order.
    pub fn runs(&self) -> &[SlotRun] {
        &self.runs
    }

    /// Every distinct non-zero slot (ascending) with its rows (ascending).
    pub fn groups(&self) -> &[(u32, Vec<u32>)] {
        &self.groups
    }

    /// True when some row uses an adapter.
    pub fn has_adapters(&self) -> bool {
        !self.runs.is_empty()
    }
}

impl From<Vec<u32>> for RowSlots {
    fn from(slots: Vec<u32>) -> Self {
        Self::new(slots)
    }
}

/// Adds LoRA contributions to the output of a base projection.
pub trait LoraDelta: Send + Sync {
    /// Returns `y` plus the LoRA contribution of `module` in `layer` for every row whose slot is
    /// non-zero. `x`: `[rows, in]` input of the projection, `y`: `[rows, out]` base output (both in
    /// the model's compute dtype), `rows`: the adapter slot of every row, grouped once per step.
    /// An implementation may add into `y`'s elements in place (and touches no others): pass the
    /// projection's own fresh output, or a column range of a fresh output whose other columns
    /// are other projections' outputs (stacked q/k/v), never a tensor that shares its elements
    /// with one still in use.
    fn apply(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
        y: Tensor,
        rows: &RowSlots,
    ) -> candle_core::Result<Tensor>;

    /// Words that name what this delta launches for a step over `rows` with the uniform row
    /// mapping ([`RowSlots::uniform`]), when a CUDA graph can record it: two steps of as many
    /// rows with equal words launch the same kernels over the same device buffers, their row
    /// tables ([`LoraDelta::graph_rows`]) aside (which adapters the delta holds; not which row
    /// uses which). `None` when it cannot be recorded (the default).
    fn graph_key(&self, rows: &RowSlots) -> Option<Vec<u64>> {
        let _ = rows;
        None
    }

    /// The uniform mapping's row table of a step over `rows`: each row's adapter index as the
    /// kernels read it, [`medley_kernels::NO_ADAPTER`] for the base model. A CUDA graph's
    /// replay writes it into the graph's table. The default indexes the step's own slots
    /// ([`RowSlots::group_indices`]).
    fn graph_rows(&self, rows: &RowSlots) -> Vec<u32> {
        rows.group_indices()
    }

    /// [`LoraDelta::apply`] for several projections of one input at once: `y` holds their base
    /// outputs side by side (`widths` columns each, in the order of `modules`; one fresh
    /// tensor), and each module's columns come back, deltas added. The default applies each
    /// module to its column range; an implementation may add all of them in one pass.
    fn apply_stacked(
        &self,
        layer: usize,
        modules: &[TargetModule],
        x: &Tensor,
        y: Tensor,
        widths: &[usize],
        rows: &RowSlots,
    ) -> candle_core::Result<Vec<Tensor>> {
        split_columns(&y, widths)?
            .into_iter()
            .zip(modules)
            .map(|(part, &module)| self.apply(layer, module, x, part, rows))
            .collect()
    }
}

/// The column ranges of `y` (`[rows, Σ widths]`), `widths` columns each, in order (views).
pub fn split_columns(y: &Tensor, widths: &[usize]) -> candle_core::Result<Vec<Tensor>> {
    let mut start = 0;
    widths
        .iter()
        .map(|&w| {
            let part = y.narrow(1, start, w);
            start += w;
            part
        })
        .collect()
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
        _rows: &RowSlots,
    ) -> candle_core::Result<Tensor> {
        Ok(y)
    }

    fn graph_key(&self, _rows: &RowSlots) -> Option<Vec<u64>> {
        Some(Vec::new())
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

    #[test]
    fn row_slots_runs_and_groups() {
        let rows = RowSlots::new(vec![0, 3, 3, 1, 0, 3, 1, 1]);
        assert_eq!(rows.len(), 8);
        assert!(rows.has_adapters());
        let runs: Vec<(u32, usize, usize)> = rows
            .runs()
            .iter()
            .map(|r| (r.slot, r.start, r.len))
            .collect();
        assert_eq!(runs, vec![(3, 1, 2), (1, 3, 1), (3, 5, 1), (1, 6, 2)]);
        assert_eq!(rows.groups(), &[(1, vec![3, 6, 7]), (3, vec![1, 2, 5])][..]);
        let base = RowSlots::from(vec![0, 0]);
        assert!(!base.has_adapters() && base.groups().is_empty());
        let none = medley_kernels::NO_ADAPTER;
        assert_eq!(rows.group_indices(), vec![none, 1, 1, 0, none, 1, 0, 0]);
        assert!(!rows.uniform() && rows.clone().into_uniform().uniform());
        assert_eq!(base.group_indices(), vec![none, none]);
    }
}
