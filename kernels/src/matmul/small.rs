//! `y = a · b` for the small products of attention tiles (a few hundred rows, columns and
//! depth), on the calling thread: the operands are strided views packed into the micro-panels
//! of [`super::packed`] and multiplied by the same micro-kernels, so attention's `Q·Kᵀ` and
//! `P·V` run on AVX-512 where the CPU has it (the `gemm` crate's stable build stops at AVX2).
//!
//! `K` is not blocked: at these sizes one `W` panel (`k × NR` values) stays in L1 and the whole
//! packed `a` in L2.

mod operands;

pub use operands::{Lhs, PackedLhs, PackedRhs, Rhs, RhsView};

use super::packed::{APanel, EdgeTile, PackAt, PanelOut, Panels, grow, with_pack_buffers};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Isa, Update};
use crate::KernelError;

/// A read-only strided matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// A row-major matrix whose rows start `rs` values apart.
    pub fn row_major(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows start `rs` values apart (`Bᵀ` stored as
    /// `B`'s rows).
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }

    /// Values a `[rows, cols]` view needs (saturating: an impossible size never fits).
    pub(crate) fn needed(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1)
            .saturating_mul(self.rs)
            .saturating_add((cols - 1).saturating_mul(self.cs))
            .saturating_add(1)
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `y = update(a · b)` for `[m, n, k]` = `dims`, `a: [m, k]`, `b: [k, n]`, `y: [m, n]` whose
/// rows start `y_rs` values apart (values between rows are left alone), on the calling thread,
/// with `isa`'s micro-kernel ([`Isa::Portable`]: plain loops). Either operand may be a strided
/// view (packed by the call; a row-major left operand is read in place instead, but for a last
/// micro-panel of fewer than `MR` rows: attention's probabilities, measured 5-10% faster at
/// 2,048-4,096 tokens than packing them) or packed before for `isa` ([`PackedLhs`],
/// [`PackedRhs::view`]).
/// Each output is one chain of multiply-adds in `k` order, so its value does not depend on the
/// other rows or columns of the call, nor on how the operands were given.
pub fn gemm_small<'a>(
    isa: Isa,
    dims: [usize; 3],
    a: impl Into<Lhs<'a>>,
    b: impl Into<Rhs<'a>>,
    y: &mut [f32],
    y_rs: usize,
    update: Update,
) -> Result<(), KernelError> {
    let (a, b) = (a.into(), b.into());
    let [m, n, k] = dims;
    if m > 0 && n > y_rs {
        return Err(KernelError::OverlappingRows {
            cols: n,
            stride: y_rs,
        });
    }
    a.check(isa, m, k)?;
    b.check(isa, k, n)?;
    crate::check_lengths(&[("y", y.len(), Strided::row_major(y, y_rs).needed(m, n))])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let mut rows: Vec<&mut [f32]> = y.chunks_mut(y_rs).take(m).map(|r| &mut r[..n]).collect();
    let ops = Operands { dims, a, b };
    dispatch(
        isa,
        Product {
            ops: &ops,
            rows: &mut rows,
            update,
        },
    )
}

/// Work to run with the micro-kernel of an instruction set ([`dispatch`]).
trait WithPanels {
    type Out;
    /// With the packed micro-kernel `t`.
    fn panels<T: Panels>(self, t: T) -> Self::Out;
    /// With plain loops ([`Isa::Portable`]).
    fn portable(self) -> Self::Out;
}

/// Runs `work` with `isa`'s micro-kernel; an instruction set the CPU lacks is an error.
fn dispatch<W: WithPanels>(isa: Isa, work: W) -> Result<W::Out, KernelError> {
    Ok(match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => work.panels(x86::Avx512::detect().ok_or_else(|| unavailable(isa))?),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => work.panels(x86::Avx2Fma::detect().ok_or_else(|| unavailable(isa))?),
        Isa::Portable => work.portable(),
        #[cfg(not(target_arch = "x86_64"))]
        _ => return Err(unavailable(isa)),
    })
}

/// One checked product into its output rows.
struct Product<'o, 'y, 'a> {
    ops: &'o Operands<'a>,
    rows: &'o mut [&'y mut [f32]],
    update: Update,
}

impl WithPanels for Product<'_, '_, '_> {
    type Out = ();
    fn panels<T: Panels>(self, t: T) {
        run(t, self.ops, self.rows, self.update)
    }
    fn portable(self) {
        portable(self.ops, self.rows, self.update)
    }
}

fn unavailable(isa: Isa) -> KernelError {
    KernelError::IsaUnavailable {
        isa: format!("{isa:?}"),
    }
}

impl Isa {
    /// Rows of the left operand's micro-panels in [`gemm_small`] (a product whose rows are a
    /// multiple of this has no padded edge panel); 1 for [`Isa::Portable`].
    pub fn lhs_panel_rows(self) -> usize {
        panel_shape(self).0
    }
}

/// `(MR, NR)` of `isa`'s panels (`(1, 1)`: the portable row-major layout).
fn panel_shape(isa: Isa) -> (usize, usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (<x86::Avx512 as Panels>::MR, <x86::Avx512 as Panels>::NR),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => (<x86::Avx2Fma as Panels>::MR, <x86::Avx2Fma as Panels>::NR),
        _ => (1, 1),
    }
}

/// `a` (`[m, k]`, checked) packed for `isa` ([`PackedLhs`]).
fn pack_lhs(isa: Isa, a: Strided<'_>, m: usize, k: usize) -> Result<Vec<f32>, KernelError> {
    dispatch(isa, PackLhs { a, m, k })
}

/// `b` (`[k, n]`, checked) packed for `isa` ([`PackedRhs`]).
fn pack_rhs(isa: Isa, b: Strided<'_>, k: usize, n: usize) -> Result<Vec<f32>, KernelError> {
    dispatch(isa, PackRhs { b, k, n })
}

/// All the micro-panels of `a: [m, k]`.
struct PackLhs<'a> {
    a: Strided<'a>,
    m: usize,
    k: usize,
}

impl WithPanels for PackLhs<'_> {
    type Out = Vec<f32>;
    fn panels<T: Panels>(self, t: T) -> Vec<f32> {
        let Self { a, m, k } = self;
        let mut data = vec![0f32; m.div_ceil(T::MR) * T::MR * k];
        pack_lhs_into(t, a, m, k, &mut data);
        data
    }
    fn portable(self) -> Vec<f32> {
        row_major_copy(self.a, self.m, self.k)
    }
}

/// All the panels of `b: [k, n]`.
struct PackRhs<'a> {
    b: Strided<'a>,
    k: usize,
    n: usize,
}

impl WithPanels for PackRhs<'_> {
    type Out = Vec<f32>;
    fn panels<T: Panels>(self, t: T) -> Vec<f32> {
        let Self { b, k, n } = self;
        let mut data = vec![0f32; n.div_ceil(T::NR) * T::NR * k];
        pack_rhs_into(t, b, n, k, &mut data);
        data
    }
    fn portable(self) -> Vec<f32> {
        row_major_copy(self.b, self.k, self.n)
    }
}

/// `[rows, cols]` of `s` as a row-major copy.
fn row_major_copy(s: Strided<'_>, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|i| (0..cols).map(move |j| s.at(i, j)))
        .collect()
}

/// The checked inputs of one product.
struct Operands<'a> {
    dims: [usize; 3],
    a: Lhs<'a>,
    b: Rhs<'a>,
}

/// The product over micro-panels: each `a` micro-panel (packed, or `MR` rows read in place)
/// stays in L1 while the `b` panels pass over it.
fn run<T: Panels>(t: T, ops: &Operands<'_>, rows: &mut [&mut [f32]], update: Update) {
    let [m, n, k] = ops.dims;
    let (mr, nr) = (T::MR, T::NR);
    if k == 0 {
        // An empty sum: zero, or nothing to add.
        if update != Update::Accumulate {
            rows.iter_mut().for_each(|r| r.fill(0.0));
        }
        return;
    }
    let (m_panels, n_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    with_pack_buffers(|pa, pb| {
        // A row-major `a` is read in place, but for a last micro-panel with fewer than `MR`
        // rows (packed, zero-padded: the micro-kernel reads `MR` rows).
        let (a_all, a_rows): (&[f32], _) = match &ops.a {
            Lhs::Packed(p) => (&p.data, None),
            Lhs::Strided(a) if a.cs == 1 => {
                let full = m / mr;
                if full < m_panels {
                    grow(pa, mr * k);
                    pack_a(t, *a, m, full * mr, &mut pa[..mr * k]);
                }
                (&pa[..], Some((*a, full)))
            }
            Lhs::Strided(a) => {
                grow(pa, m_panels * mr * k);
                let pa = &mut pa[..m_panels * mr * k];
                pack_lhs_into(t, *a, m, k, pa);
                (pa, None)
            }
        };
        let a_panel = |p: usize| match a_rows {
            Some((a, full)) if p < full => APanel::Rows {
                data: &a.data[p * mr * a.rs..],
                stride: a.rs,
            },
            Some(_) => APanel::Packed(&a_all[..mr * k]),
            None => APanel::Packed(&a_all[p * mr * k..(p + 1) * mr * k]),
        };
        let b_own: &[f32] = match &ops.b {
            Rhs::Packed(_) => &[],
            Rhs::Strided(b) => {
                grow(pb, n_panels * nr * k);
                let pb = &mut pb[..n_panels * nr * k];
                pack_rhs_into(t, *b, n, k, pb);
                pb
            }
        };
        let b_panel = |q: usize| match &ops.b {
            Rhs::Packed(v) => v.panel(q, nr),
            Rhs::Strided(_) => &b_own[q * nr * k..(q + 1) * nr * k],
        };
        let mut edge = EdgeTile::default();
        for (p, ys) in rows.chunks_mut(mr).enumerate() {
            let ap = a_panel(p);
            for q in 0..n_panels {
                let out = PanelOut {
                    rows: &mut *ys,
                    c0: q * nr,
                    update,
                };
                edge.panel(t, k, ap, b_panel(q), out);
            }
        }
    });
}

/// All the micro-panels of `a` (`[m, k]`) into `dst` (`⌈m / MR⌉ · MR · k` values).
fn pack_lhs_into<T: Panels>(t: T, a: Strided<'_>, m: usize, k: usize, dst: &mut [f32]) {
    if k > 0 {
        for (p, panel) in dst.chunks_exact_mut(T::MR * k).enumerate() {
            pack_a(t, a, m, p * T::MR, panel);
        }
    }
}

/// All the panels of `b` (`[k, n]`) into `dst` (`⌈n / NR⌉ · NR · k` values).
fn pack_rhs_into<T: Panels>(t: T, b: Strided<'_>, n: usize, k: usize, dst: &mut [f32]) {
    if k > 0 {
        for (q, panel) in dst.chunks_exact_mut(T::NR * k).enumerate() {
            pack_b(t, b, n, q * T::NR, panel);
        }
    }
}

/// Rows `r0 ..` of `a` (`[m, k]`) as a micro-panel `[k][MR]`, zeros past row `m`.
fn pack_a<T: Panels>(t: T, a: Strided<'_>, m: usize, r0: usize, panel: &mut [f32]) {
    let k = panel.len() / T::MR;
    if a.cs == 1 {
        let at = PackAt {
            rows: m,
            k: a.rs,
            k0: 0,
            kc: k,
            r0,
        };
        return t.pack(a.data, at, panel);
    }
    for (kk, out) in panel.chunks_exact_mut(T::MR).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            *o = if r0 + r < m { a.at(r0 + r, kk) } else { 0.0 };
        }
    }
}

/// Columns `c0 ..` of `b` (`[k, n]`) as a panel `[k][NR]`, zeros past column `n`.
fn pack_b<T: Panels>(t: T, b: Strided<'_>, n: usize, c0: usize, panel: &mut [f32]) {
    let (nr, k) = (T::NR, panel.len() / T::NR);
    let valid = n.saturating_sub(c0).min(nr);
    if b.rs == 1 {
        // `bᵀ` is row-major: its rows `c0 ..` are what `x` panels are made of.
        let at = PackAt {
            rows: n,
            k: b.cs,
            k0: 0,
            kc: k,
            r0: c0,
        };
        return t.pack(b.data, at, panel);
    }
    for (kk, out) in panel.chunks_exact_mut(nr).enumerate() {
        if b.cs == 1 {
            let at = kk * b.rs + c0;
            out[..valid].copy_from_slice(&b.data[at..at + valid]);
        } else {
            for (j, o) in out[..valid].iter_mut().enumerate() {
                *o = b.at(kk, c0 + j);
            }
        }
        out[valid..].fill(0.0);
    }
}

/// Plain loops (CPUs without AVX2, and the tests' second opinion), each output a chain in `k`
/// order: axpy over rows of `b` when they are contiguous (the loop the compiler vectorises),
/// else one sum per output.
fn portable(ops: &Operands<'_>, rows: &mut [&mut [f32]], update: Update) {
    let [_, _, k] = ops.dims;
    let (a, b) = (ops.a.strided(), ops.b.strided());
    for (i, row) in rows.iter_mut().enumerate() {
        if update != Update::Accumulate {
            row.fill(0.0);
        }
        if b.cs == 1 {
            for kk in 0..k {
                let (x, line) = (a.at(i, kk), &b.data[kk * b.rs..]);
                row.iter_mut().zip(line).for_each(|(y, w)| *y += x * w);
            }
        } else {
            for (j, y) in row.iter_mut().enumerate() {
                *y = (0..k).fold(*y, |acc, kk| acc + a.at(i, kk) * b.at(kk, j));
            }
        }
        if let Update::Scale(beta) = update {
            row.iter_mut().for_each(|y| *y *= beta);
        }
    }
}

#[cfg(test)]
mod tests;
