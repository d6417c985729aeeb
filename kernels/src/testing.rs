//! Deterministic inputs for the tests and benchmarks of the kernels.

/// `n` deterministic values in [-1, 1) from `seed` (a small LCG; no dependency needed).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A decode table of `rows` rows over 4 adapters where adapter 0 takes 4 rows of every 9
/// (more rows than the grouped kernels accumulate at once) and every 9th row has none.
pub fn heavy_decode_table(rows: u32) -> Vec<u32> {
    (0..rows)
        .map(|r| match r % 9 {
            0 => crate::NO_ADAPTER,
            k if k < 5 => 0,
            k => k % 4,
        })
        .collect()
}

/// Random LoRA factors for adapters of `ranks` over `in_features` → `out_features`, scaled
/// like a trained adapter's (`|x Aᵀ Bᵀ|` of order 1 for `x` in [-1, 1)): `(A, scale · Bᵀ)`
/// per adapter, `A` from seed `seed + 10 + k`, `Bᵀ` from `seed + 20 + k`.
pub fn adapter_factors(
    ranks: &[usize],
    in_features: usize,
    out_features: usize,
    seed: u64,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let scaled = |v: Vec<f32>, fan_in: usize| -> Vec<f32> {
        let s = 1.0 / (fan_in as f32).sqrt();
        v.into_iter().map(|e| e * s).collect()
    };
    ranks
        .iter()
        .enumerate()
        .map(|(k, &r)| {
            (
                scaled(values(r * in_features, seed + 10 + k as u64), in_features),
                scaled(values(r * out_features, seed + 20 + k as u64), r),
            )
        })
        .collect()
}

/// `y0` plus the LoRA of `x` by `factors` (from [`adapter_factors`], of `ranks`) under
/// `mapping`, by the reference loops (`crate::reference`).
pub fn reference_output(
    dims: crate::Shape,
    x: &[f32],
    y0: &[f32],
    mapping: crate::RowMapping<'_>,
    ranks: &[usize],
    factors: &[(Vec<f32>, Vec<f32>)],
) -> Result<Vec<f32>, crate::KernelError> {
    let refs: Vec<crate::Factors<'_, [f32]>> = factors
        .iter()
        .zip(ranks)
        .map(|((a, b), &rank)| crate::Factors {
            rank,
            a: a.as_slice(),
            b_t: b.as_slice(),
        })
        .collect();
    let dims = crate::Dims {
        rows: dims.rows,
        in_features: dims.in_features,
        out_features: dims.out_features,
        t_stride: ranks.iter().copied().max().unwrap_or(1),
    };
    let mut y = y0.to_vec();
    crate::reference::add_lora(dims, x, mapping, &refs, &mut y)?;
    Ok(y)
}

/// [`adapter_factors`] for each of several projections side by side (`widths`): entry
/// `[p][i]` holds adapter `i`'s factors for part `p`, of rank `ranks[i][p]` (empty for 0).
pub fn part_factors(
    ranks: &[Vec<usize>],
    in_features: usize,
    widths: &[usize],
    seed: u64,
) -> Vec<Vec<(Vec<f32>, Vec<f32>)>> {
    widths
        .iter()
        .enumerate()
        .map(|(p, &width)| {
            let part: Vec<usize> = ranks.iter().map(|r| r[p]).collect();
            adapter_factors(&part, in_features, width, seed + 100 * p as u64)
        })
        .collect()
}

/// `y0` plus the LoRA of several projections whose outputs sit side by side in `y`
/// (`widths`, in order; `[rows, Σ widths]`), each by the reference loops over the adapters
/// with factors for it (`ranks[i][p] > 0`, factors `factors[p][i]` from
/// [`adapter_factors`]); and whether each element of `y` gets a product (the others must
/// keep their values).
#[allow(clippy::too_many_arguments)]
pub fn reference_parts(
    rows: usize,
    in_features: usize,
    widths: &[usize],
    x: &[f32],
    y0: &[f32],
    mapping: crate::RowMapping<'_>,
    ranks: &[Vec<usize>],
    factors: &[Vec<(Vec<f32>, Vec<f32>)>],
) -> Result<(Vec<f32>, Vec<bool>), crate::KernelError> {
    let out: usize = widths.iter().sum();
    let (mut want, mut touched) = (y0.to_vec(), vec![false; rows * out]);
    let adapter_of = crate::reference::row_adapters(rows, mapping);
    let mut start = 0;
    for (p, &width) in widths.iter().enumerate() {
        // The adapters with factors for this part, renumbered, and the rows of the others
        // dropped from the mapping.
        let (mut keep, mut part_ranks, mut part_factors) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in ranks.iter().enumerate() {
            keep.push((r[p] > 0).then_some(part_ranks.len()));
            if r[p] > 0 {
                part_ranks.push(r[p]);
                part_factors.push(factors[p][i].clone());
            }
        }
        let (table, segments) = match mapping {
            crate::RowMapping::PerRow(t) => (crate::restrict_rows(t, &keep), Vec::new()),
            crate::RowMapping::Segments(s) => (Vec::new(), crate::restrict_segments(s, &keep)),
        };
        let part_mapping = match mapping {
            crate::RowMapping::PerRow(_) => crate::RowMapping::PerRow(&table),
            crate::RowMapping::Segments(_) => crate::RowMapping::Segments(&segments),
        };
        let columns: Vec<f32> = (0..rows)
            .flat_map(|r| y0[r * out + start..r * out + start + width].to_vec())
            .collect();
        let shape = crate::Shape {
            rows,
            in_features,
            out_features: width,
        };
        let part = reference_output(shape, x, &columns, part_mapping, &part_ranks, &part_factors)?;
        for &(r, a) in &adapter_of {
            if ranks[a][p] > 0 {
                let (dst, src) = (r * out + start, r * width);
                want[dst..dst + width].copy_from_slice(&part[src..src + width]);
                touched[dst..dst + width].fill(true);
            }
        }
        start += width;
    }
    Ok((want, touched))
}

/// Median seconds of `f(i)` over calls cycling `i` through `copies` weight copies (at least
/// 7 calls and about a quarter of a second), after one untimed call: the benchmarks' timer.
pub fn median_s(copies: usize, mut f: impl FnMut(usize)) -> f64 {
    f(0);
    let mut t = Vec::new();
    let start = std::time::Instant::now();
    let mut i = 1;
    while t.len() < 7 || (start.elapsed().as_secs_f64() < 0.25 && t.len() < 400) {
        let s = std::time::Instant::now();
        f(i % copies);
        t.push(s.elapsed().as_secs_f64());
        i += 1;
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
