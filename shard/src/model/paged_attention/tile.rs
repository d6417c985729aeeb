//! The prefill tile of [`super::paged_attention`]: a block of query rows attends over the key
//! tiles of its span by online softmax, with both products on the packed micro-kernels of
//! `medley_kernels::matmul::gemm_small`.

use medley_kernels::matmul::{PackedLhs, Strided, Update, gemm_small};

use super::super::kernel_math::{MulAdd, exp2_approx, exp2_shifted_sum, max};
use super::{Ctx, Gathered, Scratch, SeqSpan, TILE_KEYS, Task};

impl Ctx<'_> {
    /// A prefill tile: query rows `t.first .. t.first + t.len` of `span` for the query heads of
    /// `t.kv_head`, by online softmax over tiles of the span's gathered keys and values `kv`.
    /// Returns `[t.len, group, dim]`.
    #[inline(always)]
    pub(super) fn tile<M: MulAdd>(
        &self,
        span: &SeqSpan<'_>,
        t: &Task,
        kv: &Gathered,
        s: &mut Scratch,
    ) -> Vec<f32> {
        let (g, d) = (self.group, self.h.dim);
        let rows = t.len * g;
        // Tile rows are (token, query head), token-major: the query tile and the output rows
        // lie in `q` and in the result in the same order.
        s.q.clear();
        for k in 0..t.len {
            s.q.extend_from_slice(self.q_group(span.row + t.first + k, t.kv_head));
        }
        s.m.clear();
        s.m.resize(rows, f32::NEG_INFINITY);
        s.l.clear();
        s.l.resize(rows, 0.0);
        s.s.resize(rows * TILE_KEYS, 0.0);
        let mut acc = vec![0f32; rows * d];
        let p_first = span.start + t.first;
        let p_last = p_first + t.len - 1;
        // Packed once for all the key tiles.
        let q = PackedLhs::new(self.isa, Strided::row_major(&s.q, d), rows, d)
            .expect("paged attention: query tile packed by construction");
        // The key tiles that intersect lo(p_first) ..= p_last, starting on a panel of the
        // packed keys (keys before a row's first are masked below).
        let align = kv.kt.col_align();
        let mut k0 = kv.lo + (self.lo(p_first) - kv.lo) / align * align;
        while k0 <= p_last {
            let k1 = (k0 + TILE_KEYS).min(p_last + 1);
            let tk = k1 - k0;
            let keys = (k0 - kv.lo)..(k1 - kv.lo);
            let (kt, vt) = (kv.kt.view(0..d, keys.clone()), kv.v.view(keys, 0..d));
            let (kt, vt) = (
                kt.expect("paged attention: key tile inside the span"),
                vt.expect("paged attention: value tile inside the span"),
            );
            // S = (Q · Kᵀ) · scale · log2(e) (base 2): [rows, tk] with row stride tk.
            gemm_small(
                self.isa,
                [rows, tk, d],
                &q,
                kt,
                &mut s.s,
                tk,
                Update::Scale(self.scale2),
            )
            .expect("paged attention: scores inside their tile");
            // The mask matters only on tiles that some row sees partly (the diagonal, and the
            // window's edge).
            let whole = k0 >= self.lo(p_last) && k1 <= p_first + 1;
            for (r, row) in s.s.chunks_exact_mut(tk).take(rows).enumerate() {
                let p = p_first + r / g;
                let (c0, c1) = if whole {
                    (0, tk)
                } else {
                    (self.lo(p).clamp(k0, k1) - k0, (p + 1).clamp(k0, k1) - k0)
                };
                if c0 >= c1 {
                    row.fill(0.0);
                    continue;
                }
                let seen = &mut row[c0..c1];
                let m_old = s.m[r];
                let m_new = max(m_old, seen);
                let added = exp2_shifted_sum::<M>(seen, m_new);
                row[..c0].fill(0.0);
                row[c1..].fill(0.0);
                if m_old == f32::NEG_INFINITY {
                    // First keys of this row: the accumulator is still zero.
                    s.l[r] = added;
                } else {
                    let alpha = exp2_approx::<M>(m_old - m_new);
                    s.l[r] = s.l[r] * alpha + added;
                    if alpha != 1.0 {
                        acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                    }
                }
                s.m[r] = m_new;
            }
            // acc += P · V.
            let probs = Strided::row_major(&s.s, tk);
            gemm_small(
                self.isa,
                [rows, d, tk],
                probs,
                vt,
                &mut acc,
                d,
                Update::Accumulate,
            )
            .expect("paged attention: output inside its tile");
            k0 = k1;
        }
        // Every row saw at least its own key, so its sum is positive.
        for (o, l) in acc.chunks_exact_mut(d).zip(&s.l) {
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
        }
        acc
    }
}
