//! Names of merge strategies, sign-election methods and semantics, with case-insensitive parsing.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A name that is not one of the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown {kind} '{given}'; valid values: {valid}")]
pub struct ParseNameError {
    /// What was being parsed (`merge strategy`, `majority sign method`, `merge semantics`).
    pub kind: &'static str,
    /// The string given.
    pub given: String,
    /// Comma-separated list of valid names.
    pub valid: String,
}

fn parse_name<T: Copy>(
    kind: &'static str,
    s: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    aliases: &[(&str, T)],
) -> Result<T, ParseNameError> {
    let lower = s.trim().to_ascii_lowercase();
    all.iter()
        .copied()
        .find(|&v| name(v) == lower)
        .or_else(|| aliases.iter().find(|(a, _)| *a == lower).map(|&(_, v)| v))
        .ok_or_else(|| ParseNameError {
            kind,
            given: s.to_string(),
            valid: all.iter().map(|&v| name(v)).collect::<Vec<_>>().join(", "),
        })
}

/// A merge strategy (PEFT `combination_type` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Weighted sum per side (`task_arithmetic`).
    Linear,
    /// Magnitude pruning, sign election, disjoint mean.
    Ties,
    /// Random (Bernoulli) pruning then weighted sum.
    DareLinear,
    /// Random pruning, sign election, disjoint mean.
    DareTies,
    /// Magnitude pruning then weighted sum.
    MagnitudePrune,
    /// Concatenation of the factors: the exact `sum_i w_i s_i B_i A_i` (rank grows).
    Cat,
    /// Weighted sum of the full deltas, then truncated SVD.
    Svd,
    /// TIES on the full deltas, then truncated SVD.
    TiesSvd,
    /// DARE-linear on the full deltas, then truncated SVD.
    DareLinearSvd,
    /// DARE-TIES on the full deltas, then truncated SVD.
    DareTiesSvd,
    /// Magnitude pruning of the full deltas, then truncated SVD.
    MagnitudePruneSvd,
}

impl Strategy {
    /// Every strategy, in a fixed order.
    pub const ALL: [Strategy; 11] = [
        Strategy::Linear,
        Strategy::Ties,
        Strategy::DareLinear,
        Strategy::DareTies,
        Strategy::MagnitudePrune,
        Strategy::Cat,
        Strategy::Svd,
        Strategy::TiesSvd,
        Strategy::DareLinearSvd,
        Strategy::DareTiesSvd,
        Strategy::MagnitudePruneSvd,
    ];

    /// The canonical lower-case name (PEFT's `combination_type`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Linear => "linear",
            Strategy::Ties => "ties",
            Strategy::DareLinear => "dare_linear",
            Strategy::DareTies => "dare_ties",
            Strategy::MagnitudePrune => "magnitude_prune",
            Strategy::Cat => "cat",
            Strategy::Svd => "svd",
            Strategy::TiesSvd => "ties_svd",
            Strategy::DareLinearSvd => "dare_linear_svd",
            Strategy::DareTiesSvd => "dare_ties_svd",
            Strategy::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// The per-tensor combination this strategy applies (to factors, or to full deltas for the
    /// SVD family); `None` for `cat`.
    pub fn combination(self) -> Option<Combination> {
        Some(match self {
            Strategy::Linear | Strategy::Svd => Combination::Linear,
            Strategy::Ties | Strategy::TiesSvd => Combination::Ties,
            Strategy::DareLinear | Strategy::DareLinearSvd => Combination::DareLinear,
            Strategy::DareTies | Strategy::DareTiesSvd => Combination::DareTies,
            Strategy::MagnitudePrune | Strategy::MagnitudePruneSvd => Combination::MagnitudePrune,
            Strategy::Cat => return None,
        })
    }

    /// Whether the strategy merges full deltas and factorizes them by truncated SVD.
    pub fn is_svd(self) -> bool {
        matches!(
            self,
            Strategy::Svd
                | Strategy::TiesSvd
                | Strategy::DareLinearSvd
                | Strategy::DareTiesSvd
                | Strategy::MagnitudePruneSvd
        )
    }

    /// Whether the strategy needs a `density`.
    pub fn uses_density(self) -> bool {
        self.combination().is_some_and(Combination::uses_density)
    }

    /// Whether the strategy elects a majority sign (so `majority_sign_method` matters).
    pub fn uses_sign_method(self) -> bool {
        self.combination()
            .is_some_and(Combination::uses_sign_method)
    }

    /// Whether the strategy draws random masks (so the seed matters).
    pub fn is_random(self) -> bool {
        self.combination().is_some_and(Combination::is_random)
    }

    /// Whether all components must have the same rank for a module (per-factor strategies).
    pub fn requires_equal_rank(self) -> bool {
        !self.is_svd() && self != Strategy::Cat
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = ParseNameError;

    /// Case-insensitive; also accepts `task_arithmetic` for `linear`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_name(
            "merge strategy",
            s,
            &Strategy::ALL,
            Strategy::name,
            &[("task_arithmetic", Strategy::Linear)],
        )
    }
}

/// The per-tensor combination shared by a factor strategy and its SVD variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// `sum_i w_i T_i`.
    Linear,
    /// Magnitude prune, elect sign, disjoint mean.
    Ties,
    /// Bernoulli prune (with `1/d` rescale in PEFT semantics), weighted sum.
    DareLinear,
    /// Bernoulli prune, elect sign, disjoint mean.
    DareTies,
    /// Magnitude prune, weighted sum.
    MagnitudePrune,
}

impl Combination {
    /// Whether a density is needed.
    pub fn uses_density(self) -> bool {
        self != Combination::Linear
    }

    /// Whether a majority sign is elected.
    pub fn uses_sign_method(self) -> bool {
        matches!(self, Combination::Ties | Combination::DareTies)
    }

    /// Whether the pruning is random.
    pub fn is_random(self) -> bool {
        matches!(self, Combination::DareLinear | Combination::DareTies)
    }
}

/// How the majority sign is elected in TIES-style merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum SignMethod {
    /// Sign of the sum of the pruned values.
    #[default]
    Total,
    /// Sign of (count of positives - count of negatives).
    Frequency,
}

impl SignMethod {
    /// Every method.
    pub const ALL: [SignMethod; 2] = [SignMethod::Total, SignMethod::Frequency];

    /// Canonical lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SignMethod::Total => "total",
            SignMethod::Frequency => "frequency",
        }
    }
}

impl fmt::Display for SignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SignMethod {
    type Err = ParseNameError;

    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_name(
            "majority sign method",
            s,
            &SignMethod::ALL,
            SignMethod::name,
            &[],
        )
    }
}

/// Which reference implementation the merge reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Semantics {
    /// PEFT >= 0.19 `add_weighted_adapter`: per-side weights `sgn(c) sqrt|c|` / `sqrt|c|` with
    /// `c = w s`, DARE rescale `1/d`, merged scale 1.
    #[default]
    Peft,
    /// LoRAX: raw weights on both sides, no DARE rescale, adapter 0's `alpha/r` applied once.
    Lorax,
}

impl Semantics {
    /// Every semantics.
    pub const ALL: [Semantics; 2] = [Semantics::Peft, Semantics::Lorax];

    /// Canonical lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Semantics::Peft => "peft",
            Semantics::Lorax => "lorax",
        }
    }
}

impl fmt::Display for Semantics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Semantics {
    type Err = ParseNameError;

    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_name("merge semantics", s, &Semantics::ALL, Semantics::name, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_case_insensitive_and_round_trips() {
        for s in Strategy::ALL {
            assert_eq!(s.name().to_uppercase().parse::<Strategy>().unwrap(), s);
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        assert_eq!(
            "Task_Arithmetic".parse::<Strategy>().unwrap(),
            Strategy::Linear
        );
        assert_eq!(
            "FREQUENCY".parse::<SignMethod>().unwrap(),
            SignMethod::Frequency
        );
        assert_eq!("LoRAX".parse::<Semantics>().unwrap(), Semantics::Lorax);
    }

    #[test]
    fn unknown_names_list_valid_ones() {
        let err = "slerp".parse::<Strategy>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'slerp'") && msg.contains("dare_ties_svd") && msg.contains("cat"));
        let err = "majority".parse::<SignMethod>().unwrap_err();
        assert_eq!(err.valid, "total, frequency");
    }

    #[test]
    fn properties() {
        assert!(Strategy::Ties.uses_density() && Strategy::Ties.uses_sign_method());
        assert!(!Strategy::Linear.uses_density() && !Strategy::Cat.uses_density());
        assert!(Strategy::DareTiesSvd.is_random() && Strategy::DareTiesSvd.is_svd());
        assert!(Strategy::MagnitudePrune.requires_equal_rank());
        assert!(!Strategy::Cat.requires_equal_rank() && !Strategy::Svd.requires_equal_rank());
    }
}
