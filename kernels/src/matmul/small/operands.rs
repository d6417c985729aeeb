//! The operands of [`super::gemm_small`]: strided views, packed per call, or operands packed
//! once ([`PackedLhs`], [`PackedRhs`]) for the many products that share them (attention packs a
//! query tile once for all its key tiles, and a span's keys and values once for all its query
//! tiles).

use std::ops::Range;

use super::super::Isa;
use super::{Strided, panel_shape};
use crate::KernelError;

/// The left operand `a: [m, k]` packed for `isa`: micro-panels of `MR` rows, `[k][MR]` each,
/// zero-padded (with [`Isa::Portable`]: a row-major copy).
#[derive(Debug, Clone)]
pub struct PackedLhs {
    pub(super) isa: Isa,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) data: Vec<f32>,
}

impl PackedLhs {
    /// Packs `a` (`[m, k]`) for products on `isa` (an instruction set the CPU lacks is an
    /// error, as is an `a` too short for its shape).
    pub fn new(isa: Isa, a: Strided<'_>, m: usize, k: usize) -> Result<Self, KernelError> {
        crate::check_lengths(&[("a", a.data.len(), a.needed(m, k))])?;
        let data = super::pack_lhs(isa, a, m, k)?;
        Ok(Self { isa, m, k, data })
    }

    /// `[m, k]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.m, self.k]
    }
}

/// The right operand `b: [k, n]` packed for `isa`: panels of `NR` columns, `[k][NR]` each,
/// zero-padded (with [`Isa::Portable`]: a row-major copy).
#[derive(Debug, Clone)]
pub struct PackedRhs {
    pub(super) isa: Isa,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) data: Vec<f32>,
}

impl PackedRhs {
    /// Packs `b` (`[k, n]`) for products on `isa`.
    pub fn new(isa: Isa, b: Strided<'_>, k: usize, n: usize) -> Result<Self, KernelError> {
        crate::check_lengths(&[("b", b.data.len(), b.needed(k, n))])?;
        let data = super::pack_rhs(isa, b, k, n)?;
        Ok(Self { isa, k, n, data })
    }

    /// `[k, n]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// A view's first column must be a multiple of this (the panel width).
    pub fn col_align(&self) -> usize {
        panel_shape(self.isa).1
    }

    /// Rows `rows` and columns `cols` of `b`, as the right operand of a product; `cols.start`
    /// must be a multiple of [`col_align`](Self::col_align).
    pub fn view(&self, rows: Range<usize>, cols: Range<usize>) -> Result<RhsView<'_>, KernelError> {
        let fits = rows.start <= rows.end
            && rows.end <= self.k
            && cols.start <= cols.end
            && cols.end <= self.n
            && cols.start.is_multiple_of(self.col_align());
        if !fits {
            return Err(KernelError::PackedOperand {
                reason: format!(
                    "rows {rows:?} × columns {cols:?} of a packed [{}, {}] (columns start at \
                     multiples of {})",
                    self.k,
                    self.n,
                    self.col_align()
                ),
            });
        }
        Ok(RhsView {
            src: self,
            rows,
            cols,
        })
    }
}

/// A block of a [`PackedRhs`] ([`PackedRhs::view`]).
#[derive(Debug, Clone)]
pub struct RhsView<'a> {
    pub(super) src: &'a PackedRhs,
    pub(super) rows: Range<usize>,
    pub(super) cols: Range<usize>,
}

impl RhsView<'_> {
    /// Panel `q` of the view (`[rows.len()][NR]`, at least `rows.len() * NR` values): its
    /// columns beyond the view's last belong to later columns or padding, never to the output.
    pub(super) fn panel(&self, q: usize, nr: usize) -> &[f32] {
        let k = self.rows.len();
        let panel = self.cols.start / nr + q;
        let at = panel * self.src.k * nr + self.rows.start * nr;
        &self.src.data[at..at + k * nr]
    }

    /// The view as a strided matrix (portable layout only).
    pub(super) fn strided(&self) -> Strided<'_> {
        let n = self.src.n;
        Strided::row_major(&self.src.data[self.rows.start * n + self.cols.start..], n)
    }
}

/// The left operand of [`super::gemm_small`].
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    /// Packed by the call.
    Strided(Strided<'a>),
    /// Packed before.
    Packed(&'a PackedLhs),
}

/// The right operand of [`super::gemm_small`].
#[derive(Debug, Clone)]
pub enum Rhs<'a> {
    /// Packed by the call.
    Strided(Strided<'a>),
    /// Packed before.
    Packed(RhsView<'a>),
}

impl<'a> From<Strided<'a>> for Lhs<'a> {
    fn from(s: Strided<'a>) -> Self {
        Self::Strided(s)
    }
}

impl<'a> From<&'a PackedLhs> for Lhs<'a> {
    fn from(p: &'a PackedLhs) -> Self {
        Self::Packed(p)
    }
}

impl<'a> From<Strided<'a>> for Rhs<'a> {
    fn from(s: Strided<'a>) -> Self {
        Self::Strided(s)
    }
}

impl<'a> From<RhsView<'a>> for Rhs<'a> {
    fn from(v: RhsView<'a>) -> Self {
        Self::Packed(v)
    }
}

impl Lhs<'_> {
    /// Checks the operand against `[m, k]` on `isa`.
    pub(super) fn check(&self, isa: Isa, m: usize, k: usize) -> Result<(), KernelError> {
        match self {
            Self::Strided(a) => crate::check_lengths(&[("a", a.data.len(), a.needed(m, k))]),
            Self::Packed(p) => check_packed("left", p.isa, isa, [p.m, p.k], [m, k]),
        }
    }

    /// The operand as a strided matrix (portable layout only).
    pub(super) fn strided(&self) -> Strided<'_> {
        match self {
            Self::Strided(a) => *a,
            Self::Packed(p) => Strided::row_major(&p.data, p.k),
        }
    }
}

impl Rhs<'_> {
    /// Checks the operand against `[k, n]` on `isa`.
    pub(super) fn check(&self, isa: Isa, k: usize, n: usize) -> Result<(), KernelError> {
        match self {
            Self::Strided(b) => crate::check_lengths(&[("b", b.data.len(), b.needed(k, n))]),
            Self::Packed(v) => check_packed(
                "right",
                v.src.isa,
                isa,
                [v.rows.len(), v.cols.len()],
                [k, n],
            ),
        }
    }

    /// The operand as a strided matrix (portable layout only).
    pub(super) fn strided(&self) -> Strided<'_> {
        match self {
            Self::Strided(b) => *b,
            Self::Packed(v) => v.strided(),
        }
    }
}

fn check_packed(
    side: &str,
    packed_isa: Isa,
    isa: Isa,
    got: [usize; 2],
    want: [usize; 2],
) -> Result<(), KernelError> {
    if packed_isa != isa || got != want {
        return Err(KernelError::PackedOperand {
            reason: format!(
                "the {side} operand is a packed {got:?} for {packed_isa:?}; the product needs \
                 {want:?} for {isa:?}"
            ),
        });
    }
    Ok(())
}
