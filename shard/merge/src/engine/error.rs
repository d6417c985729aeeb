//! Errors of the merge engine (all input problems; the engine never panics on user input).

use thiserror::Error;

use crate::Strategy;

/// Why a merge was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MergeError {
    /// No components.
    #[error("a merge needs at least one component adapter")]
    NoComponents,
    /// The number of weights differs from the number of components.
    #[error(
        "{weights} weights were given for {components} component adapters; give one weight per adapter"
    )]
    WeightCount {
        /// Weights given.
        weights: usize,
        /// Components given.
        components: usize,
    },
    /// A weight is NaN or infinite.
    #[error("weight {index} is {value}; weights must be finite numbers")]
    NonFiniteWeight {
        /// Component index.
        index: usize,
        /// The weight.
        value: f32,
    },
    /// The strategy prunes but no density was given.
    #[error("merge strategy {strategy} needs a density in [0, 1] (the fraction of values kept)")]
    DensityRequired {
        /// The strategy.
        strategy: Strategy,
    },
    /// The density is outside [0, 1] or not a number.
    #[error("density {density} is outside [0, 1]")]
    DensityOutOfRange {
        /// The density.
        density: f32,
    },
    /// `svd_rank` is zero.
    #[error("svd_rank must be at least 1")]
    ZeroSvdRank,
    /// `svd_clamp` is outside [0, 1].
    #[error("svd_clamp {quantile} is outside [0, 1] (it is a quantile)")]
    ClampOutOfRange {
        /// The quantile.
        quantile: f32,
    },
    /// The strategy has no LoRAX counterpart.
    #[error(
        "merge strategy {strategy} is not available with LoRAX semantics; LoRAX supports linear, ties, dare_linear and dare_ties"
    )]
    NotInLorax {
        /// The strategy.
        strategy: Strategy,
    },
    /// The components have different ranks for a module and the strategy needs equal ranks.
    #[error(
        "module {module}: the adapters have ranks {ranks:?}, but merge strategy {strategy} needs equal ranks; use `cat` (exact, rank grows) or an SVD strategy such as `svd` to merge adapters of different ranks"
    )]
    MixedRanks {
        /// Module path.
        module: String,
        /// Ranks of the components that have the module, in component order.
        ranks: Vec<usize>,
        /// The strategy.
        strategy: Strategy,
    },
    /// LoRAX semantics: the adapters' config ranks differ (LoRAX's own check).
    #[error(
        "unable to merge adapters, lora configs have different ranks: {ranks:?}; use PEFT semantics with `cat` or an SVD strategy to merge different ranks"
    )]
    MixedConfigRanks {
        /// Config ranks, in component order.
        ranks: Vec<usize>,
    },
    /// Two components disagree on a module's shape.
    #[error(
        "module {module}: component {component} is (out {out_features}, in {in_features}) but component {first} is (out {first_out}, in {first_in}); the adapters were trained for different base models"
    )]
    ShapeMismatch {
        /// Module path.
        module: String,
        /// The first component with the module.
        first: usize,
        /// Its output features.
        first_out: usize,
        /// Its input features.
        first_in: usize,
        /// The disagreeing component.
        component: usize,
        /// Its output features.
        out_features: usize,
        /// Its input features.
        in_features: usize,
    },
    /// A component tensor contains NaN or infinity.
    #[error("module {module}: component {component} has a NaN or infinite value in lora_{side}")]
    NonFiniteValue {
        /// Module path.
        module: String,
        /// Component index.
        component: usize,
        /// `A` or `B`.
        side: char,
    },
    /// No component has any module.
    #[error("the component adapters have no LoRA modules")]
    NoModules,
}
