//! `cat`: the exact linear combination `sum_i w_i s_i B_i A_i` by stacking factors
//! (PEFT: `A = concat_rows((A_i * w_i) * s_i)`, `B = concat_cols(B_i)`, in f32).

use super::Present;
use crate::adapter::MergedModule;
use crate::matrix::Matrix;

/// Stacks the factors of the present components (in component order).
pub(crate) fn merge_module(present: &[Present<'_>], weights: &[f32]) -> MergedModule {
    let first = present[0].module;
    let (n_in, n_out) = (first.in_features(), first.out_features());
    let total: usize = present.iter().map(|p| p.module.rank()).sum();
    let mut a = Vec::with_capacity(total * n_in);
    for p in present {
        // torch multiplies an f32 tensor by Python floats as f32 scalars, left to right.
        let w = weights[p.index];
        let s = p.module.scale() as f32;
        a.extend(p.module.a().data().iter().map(|&x| (x * w) * s));
    }
    let mut b = vec![0.0f32; n_out * total];
    let mut col = 0;
    for p in present {
        let r = p.module.rank();
        for (dst, src) in b
            .chunks_exact_mut(total)
            .zip(p.module.b().data().chunks_exact(r))
        {
            dst[col..col + r].copy_from_slice(src);
        }
        col += r;
    }
    MergedModule {
        a: Matrix::from_vec(total, n_in, a),
        b: Matrix::from_vec(n_out, total, b),
    }
}
