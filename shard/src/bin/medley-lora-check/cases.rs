//! Correctness: the batched LoRA op on a device against `medley_kernels::reference` (naive
//! loops, f64 accumulation) on the host, over random inputs.

use candle_core::{DType, Device, Tensor};
use medley_kernels::testing::{heavy_decode_table, part_factors, reference_parts, values};
use medley_kernels::{NO_ADAPTER, Segment};
use medley_shard::adapters::lora_op::{KernelRows, LoraFactors, PartFactors, add_lora_parts};

/// One checked call.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the case covers, for the report.
    pub name: String,
    /// Activation dtype of `x` and `y`.
    pub dtype: DType,
    /// Rows and input features.
    pub rows: usize,
    pub in_features: usize,
    /// Output widths of the projections whose outputs sit side by side in `y` (one for a lone
    /// projection; several for a stacked q/k/v product, added in one call).
    pub parts: Vec<usize>,
    /// Each adapter's rank for each part (the mapping's indices; 0: no factors for that part,
    /// whose columns its rows must keep).
    pub ranks: Vec<Vec<usize>>,
    /// Which rows use which adapter.
    pub mapping: KernelRows,
    /// Start from `y = 0` instead of random values (every written element then shows).
    pub zero_y: bool,
    /// `y` as a column range of a wider tensor (a stacked q/k/v or gate/up product): this many
    /// columns before it and after it, which must stay unchanged. GPU only (the CPU op takes
    /// contiguous rows).
    pub y_within: Option<(usize, usize)>,
}

impl Case {
    /// A lone projection of `out_features` outputs, adapters of `ranks`, from random `y`.
    fn single(
        name: String,
        dtype: DType,
        (rows, in_features, out_features): (usize, usize, usize),
        ranks: &[usize],
        mapping: KernelRows,
    ) -> Self {
        Self {
            name,
            dtype,
            rows,
            in_features,
            parts: vec![out_features],
            ranks: ranks.iter().map(|&r| vec![r]).collect(),
            mapping,
            zero_y: false,
            y_within: None,
        }
    }

    /// Columns of `y`.
    pub fn out_features(&self) -> usize {
        self.parts.iter().sum()
    }
}

/// What one case measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// max |got − want| / max |want| over the elements that get a product.
    pub rel_err: f64,
    /// Elements that get no product (rows without an adapter, parts an adapter has no factors
    /// for, the columns around a `y_within` range) that changed (must be 0, bit for bit).
    pub unmapped_changed: usize,
    /// The bound the case must meet.
    pub tolerance: f64,
}

impl Outcome {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance && self.unmapped_changed == 0
    }
}

/// Relative error bound per activation dtype: f32 sums of a few thousand products agree with
/// f64 to ~1e-6 of the largest output; bf16 / f16 round every input and the result once
/// (2⁻⁸ / 2⁻¹¹ relative), so the 1e-2 (bf16) and a 2e-3 (f16) bound hold with room.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

/// Ragged segments of `lens` rows over `adapters` adapters in turn, with gaps (5 rows after the
/// third segment, 10 after the last); the rows they span.
fn ragged(lens: &[usize], adapters: usize) -> (Vec<Segment>, usize) {
    let mut segments = Vec::new();
    let mut start = 0;
    for (k, &len) in lens.iter().enumerate() {
        segments.push(Segment {
            start,
            len,
            adapter: k % adapters,
        });
        start += len + if k == 2 { 5 } else { 0 };
    }
    (segments, start + 10)
}

/// The cases run on `device`: every kernel (BGMV decode tables, SGMV ragged segments with gaps),
/// ranks 8/16/64 alone and mixed, ranks above 128 (several passes), rows without an adapter
/// (slot 0), odd feature counts, stacked projections in one call (an adapter without factors for
/// some of them), `y` as a column range of a wider tensor (on a GPU), and every activation dtype
/// the device supports.
pub fn cases(device: &Device) -> Vec<Case> {
    let dtypes: &[DType] = if device.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    };
    let mut out = Vec::new();
    for &dtype in dtypes {
        for ranks in [vec![8], vec![16], vec![64], vec![8, 16, 64, 128]] {
            let n = ranks.len();
            let label = ranks
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("/");
            // Decode: 32 rows, every third without an adapter.
            let table: Vec<u32> = (0..32u32)
                .map(|r| if r % 3 == 0 { NO_ADAPTER } else { r % n as u32 })
                .collect();
            out.push(Case::single(
                format!("bgmv {dtype:?} r{label} 32 rows"),
                dtype,
                (32, 2048, 5632),
                &ranks,
                KernelRows::PerRow(table),
            ));
            // Prefill: ragged segments with gaps (rows 40..45 and 150..160 have no adapter).
            let (segments, rows) = ragged(&[1, 7, 33, 5, 100], n);
            out.push(Case::single(
                format!("sgmv {dtype:?} r{label} ragged"),
                dtype,
                (rows, 1000, 333),
                &ranks,
                KernelRows::Segments(segments),
            ));
        }
        // Every output element of a mapped row is written: y starts at zero.
        out.push(Case {
            zero_y: true,
            ..Case::single(
                format!("bgmv {dtype:?} r16 from zero"),
                dtype,
                (7, 64, 4099),
                &[16, 16],
                KernelRows::PerRow(vec![0, 1, 0, 1, 1, 0, 0]),
            )
        });
        // Ranks above the kernels' 128 (a `cat` merge's): passes over slices of the rank.
        let table: Vec<u32> = (0..32u32)
            .map(|r| if r % 3 == 0 { NO_ADAPTER } else { r % 3 })
            .collect();
        let (segments, rows) = ragged(&[1, 7, 33, 5, 100], 3);
        for (kind, rows, mapping) in [
            ("bgmv", 32, KernelRows::PerRow(table)),
            ("sgmv", rows, KernelRows::Segments(segments)),
        ] {
            out.push(Case::single(
                format!("{kind} {dtype:?} r8/129/300 (rank passes)"),
                dtype,
                (rows, 1000, 333),
                &[8, 129, 300],
                mapping,
            ));
        }
        // An input width that splits unevenly, and adapters with more rows than the grouped
        // kernels take at once (8): 45 rows, 20 of them on adapter 0.
        let table = heavy_decode_table(45);
        out.push(Case::single(
            format!("bgmv {dtype:?} r8/16/64/128 in 1000"),
            dtype,
            (45, 1000, 333),
            &[8, 16, 64, 128],
            KernelRows::PerRow(table.clone()),
        ));
        // q, k and v side by side (300 + 40 + 40), one call: adapters with every part, with q
        // and v only (PEFT's default targets), of rank 128 in every part (the intermediate's
        // longest row, 384), with k only.
        let (segments, rows) = ragged(&[4, 1, 30, 2, 8], 4);
        for (kind, rows, mapping) in [
            ("bgmv", 45, KernelRows::PerRow(table.clone())),
            ("sgmv", rows, KernelRows::Segments(segments)),
        ] {
            out.push(Case {
                name: format!("{kind} {dtype:?} stacked q/k/v 300+40+40, parts missing"),
                parts: vec![300, 40, 40],
                ranks: vec![
                    vec![16, 16, 16],
                    vec![8, 0, 8],
                    vec![128, 128, 128],
                    vec![0, 64, 0],
                ],
                ..Case::single(String::new(), dtype, (rows, 512, 0), &[], mapping)
            });
        }
        if !device.is_cpu() {
            // y as k of a stacked q/k/v product: columns of q before it, of v after it; an
            // input width that is not a multiple of 4 (the shrinks' one-value loads).
            let segments = vec![
                Segment {
                    start: 0,
                    len: 20,
                    adapter: 1,
                },
                Segment {
                    start: 25,
                    len: 20,
                    adapter: 3,
                },
            ];
            for (kind, mapping) in [
                ("bgmv", KernelRows::PerRow(table)),
                ("sgmv", KernelRows::Segments(segments)),
            ] {
                out.push(Case {
                    y_within: Some((2048, 261)),
                    ..Case::single(
                        format!("{kind} {dtype:?} r8/16/64/128 in 999, y within 2048+333+261"),
                        dtype,
                        (45, 999, 333),
                        &[8, 16, 64, 128],
                        mapping,
                    )
                });
            }
        }
    }
    out
}

/// Values rounded to `dtype` and back, as the device sees them.
fn rounded(v: &[f32], dtype: DType) -> candle_core::Result<Vec<f32>> {
    Tensor::from_slice(v, v.len(), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1()
}

/// Runs one case on `device` and compares it with the reference.
pub fn run(case: &Case, device: &Device, seed: u64) -> candle_core::Result<Outcome> {
    let (rows, inf, outf) = (case.rows, case.in_features, case.out_features());
    let x = rounded(&values(rows * inf, seed), case.dtype)?;
    let y0 = if case.zero_y {
        vec![0.0; rows * outf]
    } else {
        rounded(&values(rows * outf, seed + 1), case.dtype)?
    };
    // host[p][i]: adapter i's factors for part p (empty for rank 0).
    let host = part_factors(&case.ranks, inf, &case.parts, seed);
    let (want, touched) = reference_parts(
        rows,
        inf,
        &case.parts,
        &x,
        &y0,
        case.mapping.mapping(),
        &case.ranks,
        &host,
    )
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;

    let on_device = |v: &[f32], shape: (usize, usize), dtype: DType| {
        Tensor::from_slice(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    };
    let xt = on_device(&x, (rows, inf), case.dtype)?;
    let (before, after) = case.y_within.unwrap_or((0, 0));
    let wide = before + outf + after;
    let around = rounded(&values(rows * (before + after), seed + 2), case.dtype)?;
    let y_wide: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let row = &around[r * (before + after)..(r + 1) * (before + after)];
            let own = &y0[r * outf..(r + 1) * outf];
            row[..before]
                .iter()
                .chain(own)
                .chain(&row[before..])
                .copied()
        })
        .collect();
    let y_all = on_device(&y_wide, (rows, wide), case.dtype)?;
    let yt = y_all.narrow(1, before, outf)?;
    // The factors on the device, adapter-major (None where a part has none).
    let mut ft: Vec<Option<(usize, Tensor, Tensor)>> = Vec::new();
    for (i, r) in case.ranks.iter().enumerate() {
        for (p, (&rank, &width)) in r.iter().zip(&case.parts).enumerate() {
            ft.push(if rank == 0 {
                None
            } else {
                let (a, b) = &host[p][i];
                Some((
                    rank,
                    on_device(a, (rank, inf), DType::F32)?,
                    on_device(b, (rank, width), DType::F32)?,
                ))
            });
        }
    }
    let factors = PartFactors {
        widths: case.parts.clone(),
        entries: ft
            .iter()
            .map(|f| {
                f.as_ref().map(|(rank, a, b_t)| LoraFactors {
                    rank: *rank,
                    a,
                    b_t,
                })
            })
            .collect(),
    };
    add_lora_parts(&xt, &yt, &case.mapping, &factors)?;
    let got: Vec<f32> = yt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut outcome = compare(case, &y0, &want, &touched, &got);
    let all: Vec<f32> = y_all.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    outcome.unmapped_changed += all
        .iter()
        .zip(&y_wide)
        .enumerate()
        .filter(|(i, (g, y))| {
            let c = i % wide;
            (c < before || c >= before + outf) && g.to_bits() != y.to_bits()
        })
        .count();
    Ok(outcome)
}

/// The outcome of `got` against `want` where `touched`, against `y0` (bit for bit) elsewhere.
fn compare(case: &Case, y0: &[f32], want: &[f32], touched: &[bool], got: &[f32]) -> Outcome {
    let (mut max_err, mut max_want, mut unmapped_changed) = (0f64, 0f64, 0usize);
    for (k, &t) in touched.iter().enumerate() {
        if t {
            max_err = max_err.max((got[k] as f64 - want[k] as f64).abs());
            max_want = max_want.max((want[k] as f64).abs());
        } else if got[k].to_bits() != y0[k].to_bits() {
            unmapped_changed += 1;
        }
    }
    Outcome {
        rel_err: if max_want > 0.0 {
            max_err / max_want
        } else {
            max_err
        },
        unmapped_changed,
        tolerance: tolerance(case.dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_case_passes() {
        let device = Device::Cpu;
        let cases = cases(&device);
        assert!(cases.len() >= 11);
        assert!(cases.iter().any(|c| c.parts.len() == 3));
        for case in &cases {
            let outcome = run(case, &device, 7).expect("run");
            assert!(outcome.passed(), "{}: {outcome:?}", case.name);
        }
    }

    #[test]
    fn a_wrong_result_fails() {
        let case = &cases(&Device::Cpu)[0];
        let n = case.rows * case.out_features();
        let y0 = vec![0.0; n];
        let mut want = vec![1.0; n];
        let got = want.clone();
        // Row 0 gets no product: changing it is caught; so is an error in a row that does.
        let mut touched = vec![true; n];
        touched[..case.out_features()].fill(false);
        want[0] = 0.0;
        let mut bad = got.clone();
        bad[case.out_features() + 3] = 1.5;
        let o = compare(case, &y0, &want, &touched, &bad);
        assert!(!o.passed() && o.unmapped_changed > 0 && o.rel_err > 0.4);
    }
}
