//! Naive reference loops (f64 accumulation, no parallelism): what every [`LoraKernels`]
//! implementation is tested against.
//!
//! [`LoraKernels`]: crate::LoraKernels

use crate::{Dims, Factors, KernelError, NO_ADAPTER, RowMapping, check_call};

/// `y[row, :] += x[row, :] Aᵢᵀ Bᵢᵀ` for every row mapped to an adapter, accumulating each output
/// in f64.
pub fn add_lora(
    dims: Dims,
    x: &[f32],
    mapping: RowMapping<'_>,
    adapters: &[Factors<'_, [f32]>],
    y: &mut [f32],
) -> Result<(), KernelError> {
    let lens = [
        ("x", x.len(), dims.rows.saturating_mul(dims.in_features)),
        ("y", y.len(), dims.rows.saturating_mul(dims.out_features)),
    ];
    check_call(dims, &lens, mapping, adapters)?;
    for (row, adapter) in row_adapters(dims.rows, mapping) {
        let f = adapters[adapter];
        let xr = &x[row * dims.in_features..(row + 1) * dims.in_features];
        let t: Vec<f64> = (0..f.rank)
            .map(|j| {
                let a = &f.a[j * dims.in_features..(j + 1) * dims.in_features];
                xr.iter().zip(a).map(|(&u, &v)| u as f64 * v as f64).sum()
            })
            .collect();
        for o in 0..dims.out_features {
            let d: f64 = (0..f.rank)
                .map(|j| t[j] * f.b_t[j * dims.out_features + o] as f64)
                .sum();
            let out = &mut y[row * dims.out_features + o];
            *out = (*out as f64 + d) as f32;
        }
    }
    Ok(())
}

/// `(row, adapter)` for every mapped row, in row order.
pub(crate) fn row_adapters(rows: usize, mapping: RowMapping<'_>) -> Vec<(usize, usize)> {
    match mapping {
        RowMapping::Segments(segments) => {
            let mut out: Vec<(usize, usize)> = segments
                .iter()
                .flat_map(|s| (s.start..s.start + s.len).map(move |r| (r, s.adapter)))
                .collect();
            out.sort_unstable();
            out
        }
        RowMapping::PerRow(map) => map
            .iter()
            .take(rows)
            .enumerate()
            .filter(|(_, a)| **a != NO_ADAPTER)
            .map(|(r, a)| (r, *a as usize))
            .collect(),
    }
}
