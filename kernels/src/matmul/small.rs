//! `y = a · b` for the small products of attention tiles (a few hundred rows, columns and
//! depth), on the calling thread: the operands are strided views packed into the micro-panels
//! of [`super::packed`] and multiplied by the same micro-kernels, so attention's `Q·Kᵀ` and
//! `P·V` run on AVX-512 where the CPU has it (the `gemm` crate's stable build stops at AVX2).
//!
//! `K` is not blocked: at these sizes one `W` panel (`k × NR` values) stays in L1 and the whole
//! packed `a` in L2.

use super::packed::{EdgeTile, PackAt, PanelOut, Panels, grow, with_pack_buffers};
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
    fn needed(&self, rows: usize, cols: usize) -> usize {
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
/// with `isa`'s micro-kernel ([`Isa::Portable`]: plain loops, a reference rather than a fast
/// path). Each output is one chain of multiply-adds in `k` order, so its value does not depend
/// on the other rows or columns of the call.
pub fn gemm_small(
    isa: Isa,
    dims: [usize; 3],
    a: Strided<'_>,
    b: Strided<'_>,
    y: &mut [f32],
    y_rs: usize,
    update: Update,
) -> Result<(), KernelError> {
    let [m, n, k] = dims;
    if m > 0 && n > y_rs {
        return Err(KernelError::OverlappingRows {
            cols: n,
            stride: y_rs,
        });
    }
    crate::check_lengths(&[
        ("a", a.data.len(), a.needed(m, k)),
        ("b", b.data.len(), b.needed(k, n)),
        ("y", y.len(), Strided::row_major(y, y_rs).needed(m, n)),
    ])?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let unavailable = || KernelError::IsaUnavailable {
        isa: format!("{isa:?}"),
    };
    let mut rows: Vec<&mut [f32]> = y.chunks_mut(y_rs).take(m).map(|r| &mut r[..n]).collect();
    let operands = Operands { dims, a, b };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let t = super::x86::Avx512::detect().ok_or_else(unavailable)?;
            run(t, &operands, &mut rows, update);
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            let t = super::x86::Avx2Fma::detect().ok_or_else(unavailable)?;
            run(t, &operands, &mut rows, update);
        }
        Isa::Portable => portable(&operands, &mut rows, update),
        #[cfg(not(target_arch = "x86_64"))]
        _ => return Err(unavailable()),
    }
    Ok(())
}

/// The checked inputs of one product.
struct Operands<'a> {
    dims: [usize; 3],
    a: Strided<'a>,
    b: Strided<'a>,
}

/// The packed product.
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
        grow(pa, m_panels * mr * k);
        grow(pb, n_panels * nr * k);
        let (pa, pb) = (&mut pa[..m_panels * mr * k], &mut pb[..n_panels * nr * k]);
        for (p, panel) in pa.chunks_exact_mut(mr * k).enumerate() {
            pack_a(t, ops.a, m, p * mr, panel);
        }
        for (q, panel) in pb.chunks_exact_mut(nr * k).enumerate() {
            pack_b(t, ops.b, n, q * nr, panel);
        }
        let mut edge = EdgeTile::default();
        for (q, bq) in pb.chunks_exact(nr * k).enumerate() {
            for (ap, ys) in pa.chunks_exact(mr * k).zip(rows.chunks_mut(mr)) {
                let out = PanelOut {
                    rows: ys,
                    c0: q * nr,
                    update,
                };
                edge.panel(t, k, ap, bq, out);
            }
        }
    });
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

/// Plain loops (CPUs without AVX2, and the tests' second opinion).
fn portable(ops: &Operands<'_>, rows: &mut [&mut [f32]], update: Update) {
    let [_, _, k] = ops.dims;
    for (i, row) in rows.iter_mut().enumerate() {
        for (j, y) in row.iter_mut().enumerate() {
            let start = if update == Update::Accumulate {
                *y
            } else {
                0.0
            };
            let sum = (0..k).fold(start, |acc, kk| acc + ops.a.at(i, kk) * ops.b.at(kk, j));
            *y = match update {
                Update::Scale(beta) => beta * sum,
                Update::Store | Update::Accumulate => sum,
            };
        }
    }
}

#[cfg(test)]
mod tests;
