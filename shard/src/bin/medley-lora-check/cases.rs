//! Correctness: the batched LoRA op on a device against `medley_kernels::reference` (naive
//! loops, f64 accumulation) on the host, over random inputs.

use candle_core::{DType, Device, Tensor};
use medley_kernels::testing::{adapter_factors, heavy_decode_table, reference_output, values};
use medley_kernels::{NO_ADAPTER, Segment, Shape};
use medley_shard::adapters::lora_op::{KernelRows, LoraFactors, add_lora};

/// One checked call.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the case covers, for the report.
    pub name: String,
    /// Activation dtype of `x` and `y`.
    pub dtype: DType,
    /// Rows, input and output features.
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// The rank of each adapter (indices of the mapping).
    pub ranks: Vec<usize>,
    /// Which rows use which adapter.
    pub mapping: KernelRows,
    /// Start from `y = 0` instead of random values (every written element then shows).
    pub zero_y: bool,
    /// `y` as a column range of a wider tensor (a stacked q/k/v or gate/up product): this many
    /// columns before it and after it, which must stay unchanged. GPU only (the CPU op takes
    /// contiguous rows).
    pub y_within: Option<(usize, usize)>,
}

/// What one case measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// max |got − want| / max |want| over the mapped rows.
    pub rel_err: f64,
    /// Elements of unmapped rows, or of the columns around a `y_within` range, that changed
    /// (must be 0, bit for bit).
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

/// The cases run on `device`: every kernel (BGMV decode tables, SGMV ragged segments with gaps),
/// ranks 8/16/64 alone and mixed, rows without an adapter (slot 0), odd feature counts, `y` as
/// a column range of a wider tensor (on a GPU), and every activation dtype the device supports.
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
            out.push(Case {
                name: format!("bgmv {dtype:?} r{label} 32 rows"),
                dtype,
                rows: 32,
                in_features: 2048,
                out_features: 5632,
                ranks: ranks.clone(),
                mapping: KernelRows::PerRow(table),
                zero_y: false,
                y_within: None,
            });
            // Prefill: ragged segments with gaps (rows 40..45 and 150..160 have no adapter).
            let lens = [1usize, 7, 33, 5, 100];
            let mut segments = Vec::new();
            let mut start = 0;
            for (k, len) in lens.into_iter().enumerate() {
                segments.push(Segment {
                    start,
                    len,
                    adapter: k % n,
                });
                start += len + if k == 2 { 5 } else { 0 };
            }
            out.push(Case {
                name: format!("sgmv {dtype:?} r{label} ragged"),
                dtype,
                rows: start + 10,
                in_features: 1000,
                out_features: 333,
                ranks,
                mapping: KernelRows::Segments(segments),
                zero_y: false,
                y_within: None,
            });
        }
        // Every output element of a mapped row is written: y starts at zero.
        out.push(Case {
            name: format!("bgmv {dtype:?} r16 from zero"),
            dtype,
            rows: 7,
            in_features: 64,
            out_features: 4099,
            ranks: vec![16, 16],
            mapping: KernelRows::PerRow(vec![0, 1, 0, 1, 1, 0, 0]),
            zero_y: true,
            y_within: None,
        });
        // An input width that splits unevenly, and adapters with more rows than the grouped
        // kernels take at once (8): 45 rows, 20 of them on adapter 0.
        let table = heavy_decode_table(45);
        out.push(Case {
            name: format!("bgmv {dtype:?} r8/16/64/128 in 1000"),
            dtype,
            rows: 45,
            in_features: 1000,
            out_features: 333,
            ranks: vec![8, 16, 64, 128],
            mapping: KernelRows::PerRow(table.clone()),
            zero_y: false,
            y_within: None,
        });
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
                    name: format!("{kind} {dtype:?} r8/16/64/128 in 999, y within 2048+333+261"),
                    dtype,
                    rows: 45,
                    in_features: 999,
                    out_features: 333,
                    ranks: vec![8, 16, 64, 128],
                    mapping,
                    zero_y: false,
                    y_within: Some((2048, 261)),
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
    let (rows, inf, outf) = (case.rows, case.in_features, case.out_features);
    let x = rounded(&values(rows * inf, seed), case.dtype)?;
    let y0 = if case.zero_y {
        vec![0.0; rows * outf]
    } else {
        rounded(&values(rows * outf, seed + 1), case.dtype)?
    };
    let host = adapter_factors(&case.ranks, inf, outf, seed);
    let shape = Shape {
        rows,
        in_features: inf,
        out_features: outf,
    };
    let want = reference_output(shape, &x, &y0, case.mapping.mapping(), &case.ranks, &host)
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
    let ft: Vec<(Tensor, Tensor)> = host
        .iter()
        .zip(&case.ranks)
        .map(|((a, b), &r)| {
            Ok((
                on_device(a, (r, inf), DType::F32)?,
                on_device(b, (r, outf), DType::F32)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let factors: Vec<LoraFactors<'_>> = ft
        .iter()
        .zip(&case.ranks)
        .map(|((a, b_t), &rank)| LoraFactors { rank, a, b_t })
        .collect();
    add_lora(&xt, &yt, &case.mapping, &factors)?;
    let got: Vec<f32> = yt.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut outcome = compare(case, &y0, &want, &got);
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

fn compare(case: &Case, y0: &[f32], want: &[f32], got: &[f32]) -> Outcome {
    let outf = case.out_features;
    let mut mapped = vec![false; case.rows];
    match &case.mapping {
        KernelRows::PerRow(t) => {
            for (r, &a) in t.iter().enumerate() {
                mapped[r] = a != NO_ADAPTER;
            }
        }
        KernelRows::Segments(s) => {
            for seg in s {
                mapped[seg.start..seg.start + seg.len].fill(true);
            }
        }
    }
    let (mut max_err, mut max_want, mut unmapped_changed) = (0f64, 0f64, 0usize);
    for (r, &m) in mapped.iter().enumerate() {
        let span = r * outf..(r + 1) * outf;
        if m {
            for (g, w) in got[span.clone()].iter().zip(&want[span]) {
                max_err = max_err.max((*g as f64 - *w as f64).abs());
                max_want = max_want.max((*w as f64).abs());
            }
        } else {
            unmapped_changed += got[span.clone()]
                .iter()
                .zip(&y0[span])
                .filter(|(g, y)| g.to_bits() != y.to_bits())
                .count();
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
        assert!(cases.len() >= 9);
        for case in &cases {
            let outcome = run(case, &device, 7).expect("run");
            assert!(outcome.passed(), "{}: {outcome:?}", case.name);
        }
    }

    #[test]
    fn a_wrong_result_fails() {
        let case = &cases(&Device::Cpu)[0];
        let y0 = vec![0.0; case.rows * case.out_features];
        let mut want = vec![1.0; y0.len()];
        let got = want.clone();
        // Row 0 has no adapter: changing it is caught; so is an error in a mapped row.
        want[0] = 0.0;
        let mut bad = got.clone();
        bad[case.out_features + 3] = 1.5;
        let o = compare(case, &y0, &want, &bad);
        assert!(!o.passed() && o.unmapped_changed > 0 && o.rel_err > 0.4);
    }
}
