//! `kernels/cuda/lora.cu` on the CPU emulator against `medley_kernels::reference` (f64
//! accumulation): every entry point (BGMV per row, grouped, fused and fused grouped, SGMV),
//! f32/bf16/f16 activations with f32 factors, launched with the shapes the GPU launcher computes
//! (`medley_kernels::launch`). The fused kernels must leave their counters at zero. The
//! intermediate starts as NaN, so an expand that reads an entry no shrink wrote poisons its
//! rows; rows without an adapter must stay unchanged bit for bit.
//! Each case also runs with `y` as a column range of a wider output (rows `y_stride` apart, as
//! q is of a stacked q/k/v product): the columns beyond it must stay unchanged too. Stacked
//! cases run several projections' LoRA in one launch pair (`parts`), adapters with no factors
//! for a part included: that part's columns of their rows must stay unchanged. Ranks above
//! `MAX_RANK` run in passes over slices of the rank, as the CUDA launcher runs them.

use medley_kernels::launch::{
    FUSED_BGMV_SYNC_WORDS, RankSlice, expand_launch, fused_bgmv_kernel_name, fused_bgmv_launch,
    fused_grouped_kernel_name, fused_grouped_launch, grouped_expand_launch, grouped_kernel_names,
    grouped_shrink_launch, grouped_splits, kernel_names, rank_passes, segment_triples,
    shrink_launch,
};
use medley_kernels::testing::{heavy_decode_table, part_factors, reference_parts, values};
use medley_kernels::{NO_ADAPTER, RowMapping, Segment};
use medley_kernels_emu::{Act, launch, param};

/// Which kernels a case runs.
#[derive(Debug, Clone)]
enum Mapping {
    /// BGMV, one adapter per row, through the per-row kernels.
    PerRow(Vec<u32>),
    /// BGMV through the grouped kernels.
    Grouped(Vec<u32>),
    /// BGMV through the fused kernel (shrink and expand in one launch).
    Fused(Vec<u32>),
    /// BGMV through the fused grouped kernel (the grouped shrink and expand in one launch).
    FusedGrouped(Vec<u32>),
    /// SGMV over segments.
    Segments(Vec<Segment>),
}

impl Mapping {
    fn kernel_rows(&self) -> RowMapping<'_> {
        match self {
            Self::PerRow(t) | Self::Grouped(t) | Self::Fused(t) | Self::FusedGrouped(t) => {
                RowMapping::PerRow(t)
            }
            Self::Segments(s) => RowMapping::Segments(s),
        }
    }
}

struct Case {
    /// Launch the expand over one block of outputs fewer than it needs (the failure test).
    short_expand: bool,
    /// Pass `out` as the expand's row stride of `y` whatever its buffer's (the stride failure
    /// test).
    ignore_stride: bool,
    /// Tell the kernels that adapter 0 has no factors for part 0 (the parts failure test).
    drop_first_part: bool,
    rows: usize,
    in_features: usize,
    /// The widths of the projections whose outputs sit side by side in `y` (one for a lone
    /// projection).
    parts: Vec<usize>,
    /// Each adapter's rank for each part (0: no factors for it).
    ranks: Vec<Vec<usize>>,
    mapping: Mapping,
}

impl Case {
    /// A lone projection of `out_features` outputs, adapters of `ranks`.
    fn single(
        rows: usize,
        in_features: usize,
        out_features: usize,
        ranks: &[usize],
        mapping: Mapping,
    ) -> Self {
        Self {
            short_expand: false,
            ignore_stride: false,
            drop_first_part: false,
            rows,
            in_features,
            parts: vec![out_features],
            ranks: ranks.iter().map(|&r| vec![r]).collect(),
            mapping,
        }
    }

    fn out_features(&self) -> usize {
        self.parts.iter().sum()
    }

    fn mapping_name(&self) -> &'static str {
        match self.mapping {
            Mapping::PerRow(_) => "bgmv",
            Mapping::Grouped(_) => "bgmv grouped",
            Mapping::Fused(_) => "bgmv fused",
            Mapping::FusedGrouped(_) => "bgmv fused grouped",
            Mapping::Segments(_) => "sgmv",
        }
    }
}

/// What a run measured: the worst error relative to the largest expected output, and the
/// elements that changed outside the products' columns. `pad`: extra columns of `y`'s buffer
/// after each row's `out` (its rows are `out + pad` apart).
fn run<T: Act>(case: &Case, seed: u64, pad: usize) -> (f64, usize) {
    let (rows, inf, outf) = (case.rows, case.in_features, case.out_features());
    let y_stride = outf + pad;
    let round =
        |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|e| T::from_f32(e).to_f32()).collect() };
    let x = round(values(rows * inf, seed));
    let y0 = round(values(rows * outf, seed + 1));
    // factors[p][i]: adapter i's factors for part p (empty for rank 0).
    let factors = part_factors(&case.ranks, inf, &case.parts, seed);
    let (want, touched) = reference_parts(
        rows,
        inf,
        &case.parts,
        &x,
        &y0,
        case.mapping.kernel_rows(),
        &case.ranks,
        &factors,
    )
    .expect("reference");

    // y's buffer: each row's `out` values, then `pad` more that no kernel may touch.
    let filler = round(values(rows * pad.max(1), seed + 2));
    let y_buf: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let own = &y0[r * outf..(r + 1) * outf];
            own.iter().chain(&filler[r * pad..(r + 1) * pad]).copied()
        })
        .collect();
    let mut xs: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut ys: Vec<T> = y_buf.iter().map(|&v| T::from_f32(v)).collect();
    // Ranks above MAX_RANK take several passes, each over a slice of every factor pair's rank,
    // as the CUDA launcher runs them: the kernels' operands for each, at the slice's first row.
    let n_parts = case.parts.len();
    for pass in 0..rank_passes(case.ranks.iter().flatten().copied()) {
        let entries = (0..case.ranks.len()).flat_map(|i| (0..n_parts).map(move |p| (i, p)));
        let mut operands = Operands {
            a: Vec::new(),
            b: Vec::new(),
            ranks: Vec::new(),
        };
        for (i, p) in entries {
            let (a, b) = &factors[p][i];
            let slice = RankSlice::of(case.ranks[i][p], pass);
            // SAFETY: the slice's rows are within the factor's rank rows (an empty slice
            // points one past them, never read).
            unsafe {
                operands.a.push(a.as_ptr().add(slice.first * inf));
                operands.b.push(b.as_ptr().add(slice.first * case.parts[p]));
            }
            operands.ranks.push(slice.rank as u32);
        }
        launch_pass(case, operands, &mut xs, &mut ys, y_stride);
    }
    measure(&ys, &y_buf, &want, &touched, rows, outf, y_stride)
}

/// One pass's factor operands (one entry per (adapter, part)): the A and Bᵀ pointers and ranks.
struct Operands {
    a: Vec<*const f32>,
    b: Vec<*const f32>,
    ranks: Vec<u32>,
}

/// Launches `case`'s kernels once over `xs` and `ys` (rows `y_stride` apart) with `operands`.
fn launch_pass<T: Act>(
    case: &Case,
    operands: Operands,
    xs: &mut [T],
    ys: &mut [T],
    y_stride: usize,
) {
    let (rows, inf, outf) = (case.rows, case.in_features, case.out_features());
    let n_parts = case.parts.len();
    let Operands {
        a: mut a_ptrs,
        b: mut b_ptrs,
        mut ranks,
    } = operands;
    if case.drop_first_part {
        ranks[0] = 0;
    }
    let mut col_ends: Vec<u32> = case
        .parts
        .iter()
        .scan(0u32, |end, &w| {
            *end += w as u32;
            Some(*end)
        })
        .collect();
    let mut map: Vec<u32> = match &case.mapping {
        Mapping::PerRow(t) | Mapping::Grouped(t) | Mapping::Fused(t) | Mapping::FusedGrouped(t) => {
            t.to_vec()
        }
        Mapping::Segments(s) => segment_triples(s),
    };
    let max_total = ranks
        .chunks(n_parts)
        .map(|r| r.iter().sum::<u32>() as usize)
        .max()
        .unwrap_or(1)
        .max(1);
    let (n, t_stride) = (case.ranks.len() as u32, max_total as u32);
    let (mut in_f, mut out_f, mut stride) = (inf as u32, outf as u32, t_stride);
    let mut parts = n_parts as u32;
    let mut y_stride_u = if case.ignore_stride { outf } else { y_stride } as u32;
    let (mut x_p, mut y_p) = (xs.as_mut_ptr(), ys.as_mut_ptr());
    let (mut a_p, mut b_p) = (a_ptrs.as_mut_ptr(), b_ptrs.as_mut_ptr());
    let (mut ranks_p, mut map_p) = (ranks.as_mut_ptr(), map.as_mut_ptr());
    let mut ends_p = col_ends.as_mut_ptr();
    if matches!(case.mapping, Mapping::Fused(_) | Mapping::FusedGrouped(_)) {
        let grouped = matches!(case.mapping, Mapping::FusedGrouped(_));
        let (rows_u, n) = (rows as u32, case.ranks.len() as u32);
        let (splits, mut split_len) = grouped_splits(n, t_stride, in_f);
        let (name, mut shape, t_len) = if grouped {
            (
                fused_grouped_kernel_name(T::SUFFIX),
                fused_grouped_launch(n, t_stride, splits, out_f, rows_u),
                splits as usize * rows * max_total,
            )
        } else {
            let (grid, block) = fused_bgmv_launch(rows_u, t_stride, out_f);
            (
                fused_bgmv_kernel_name(T::SUFFIX),
                (grid, block, 0),
                rows * max_total,
            )
        };
        if case.short_expand {
            shape.0.0 -= 1;
        }
        let mut t = vec![f32::NAN; t_len];
        let mut t_p = t.as_mut_ptr();
        let mut sync = vec![0u32; FUSED_BGMV_SYNC_WORDS + rows];
        let mut sync_p = sync.as_mut_ptr();
        let (mut rows_u, mut max_rank, mut n, mut splits) = (rows_u, t_stride, n, splits);
        let mut params = vec![
            param(&mut x_p),
            param(&mut map_p),
            param(&mut a_p),
            param(&mut b_p),
            param(&mut ranks_p),
            param(&mut parts),
            param(&mut ends_p),
            param(&mut t_p),
            param(&mut y_p),
            param(&mut in_f),
            param(&mut out_f),
            param(&mut stride),
            param(&mut y_stride_u),
            param(&mut rows_u),
        ];
        if grouped {
            params.extend([
                param(&mut n),
                param(&mut max_rank),
                param(&mut splits),
                param(&mut split_len),
            ]);
        } else {
            params.push(param(&mut max_rank));
        }
        params.push(param(&mut sync_p));
        // SAFETY: the parameters are the kernel's, in order; t holds what its shrink writes, y
        // rows × y_stride values, sync FUSED_BGMV_SYNC_WORDS + rows zeros (adapters <= rows).
        unsafe { launch(name, shape, &mut params) }.expect("fused");
        assert!(
            sync.iter().all(|&w| w == 0),
            "the fused kernel leaves its counters as it found them: {sync:?}"
        );
        return;
    }
    // Per mapping: the kernels, their launch shapes, the intermediate's splits (grouped
    // shrinks split the input), and the grouped kernels' two extra parameters.
    let names = kernel_names(T::SUFFIX);
    let [grouped_shrink, grouped_expand] = grouped_kernel_names(T::SUFFIX);
    let mut rows_u = rows as u32;
    let (shrink, expand, shrink_shape, mut expand_shape, splits, mut split_param) =
        match &case.mapping {
            Mapping::Grouped(_) => {
                let (splits, split_len) = grouped_splits(n, t_stride, in_f);
                (
                    grouped_shrink,
                    grouped_expand,
                    grouped_shrink_launch(n, t_stride, splits, rows_u),
                    grouped_expand_launch(n, out_f, rows_u),
                    splits,
                    split_len,
                )
            }
            m => {
                let (units, longest, s, e) = match m {
                    Mapping::Segments(s) => (
                        s.len() as u32,
                        s.iter().map(|s| s.len).max().unwrap_or(1) as u32,
                        names[1],
                        names[3],
                    ),
                    _ => (rows as u32, 1, names[0], names[2]),
                };
                let (sg, sb) = shrink_launch(units, t_stride, longest);
                let (eg, eb) = expand_launch(units, out_f, longest);
                (s, e, (sg, sb, 0), (eg, eb, 0), 1, 0)
            }
        };
    if case.short_expand {
        expand_shape.0.1 -= 1;
    }
    let grouped = matches!(case.mapping, Mapping::Grouped(_));
    let mut splits_param = splits;
    // NaN, so that an expand reading an entry no shrink wrote poisons its row.
    let mut t = vec![f32::NAN; splits as usize * rows * max_total];
    let mut t_p = t.as_mut_ptr();
    let mut params = vec![
        param(&mut x_p),
        param(&mut map_p),
        param(&mut a_p),
        param(&mut ranks_p),
        param(&mut parts),
        param(&mut t_p),
        param(&mut in_f),
        param(&mut stride),
    ];
    if grouped {
        params.extend([param(&mut rows_u), param(&mut split_param)]);
    }
    // SAFETY: the parameters are the kernel's, in order; the buffers hold what the launch
    // reads and writes (t: splits × rows × t_stride).
    unsafe { launch(shrink, shrink_shape, &mut params) }.expect("shrink");
    let mut params = vec![
        param(&mut t_p),
        param(&mut map_p),
        param(&mut b_p),
        param(&mut ranks_p),
        param(&mut parts),
        param(&mut ends_p),
        param(&mut y_p),
        param(&mut out_f),
        param(&mut stride),
        param(&mut y_stride_u),
    ];
    if grouped {
        params.extend([param(&mut rows_u), param(&mut splits_param)]);
    }
    // SAFETY: as above; y holds rows × y_stride values.
    unsafe { launch(expand, expand_shape, &mut params) }.expect("expand");
}

/// The worst error of `ys` against `want` over the `touched` elements relative to the largest
/// expected value, and the elements of `ys` outside them that differ from `y_buf` (bit for bit).
fn measure<T: Act>(
    ys: &[T],
    y_buf: &[f32],
    want: &[f32],
    touched: &[bool],
    rows: usize,
    outf: usize,
    y_stride: usize,
) -> (f64, usize) {
    let (mut err, mut scale, mut changed) = (0f64, 0f64, 0usize);
    for r in 0..rows {
        for c in 0..y_stride {
            let (got, before) = (ys[r * y_stride + c].to_f32(), y_buf[r * y_stride + c]);
            if c < outf && touched[r * outf + c] {
                let want = want[r * outf + c] as f64;
                err = err.max((got as f64 - want).abs());
                scale = scale.max(want.abs());
            } else if got.to_bits() != before.to_bits() {
                changed += 1;
            }
        }
    }
    (if scale > 0.0 { err / scale } else { err }, changed)
}

/// The cases of `medley-lora-check` (its decode table with every third row unmapped, its
/// ragged segments with gaps) plus a decode table with an adapter of 20 rows (more than the
/// grouped kernels take at once) over an input width that splits unevenly, stacked
/// projections, and ranks above MAX_RANK (several passes).
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for ranks in [vec![8], vec![16], vec![64], vec![8, 16, 64, 128]] {
        let n = ranks.len() as u32;
        let table: Vec<u32> = (0..32u32)
            .map(|r| if r % 3 == 0 { NO_ADAPTER } else { r % n })
            .collect();
        for mapping in [
            Mapping::PerRow(table.clone()),
            Mapping::Grouped(table.clone()),
            Mapping::Fused(table.clone()),
            Mapping::FusedGrouped(table),
        ] {
            out.push(Case::single(32, 2048, 600, &ranks, mapping));
        }
        let mut segments = Vec::new();
        let mut start = 0;
        for (k, len) in [1usize, 7, 33, 5, 100].into_iter().enumerate() {
            segments.push(Segment {
                start,
                len,
                adapter: k % ranks.len(),
            });
            start += len + if k == 2 { 5 } else { 0 };
        }
        out.push(Case::single(
            start + 10,
            1000,
            333,
            &ranks,
            Mapping::Segments(segments),
        ));
    }
    // An input width that is not a multiple of 4: the shrinks read one value at a time (the
    // widths above take their four-value loads).
    let table: Vec<u32> = vec![0, 1, NO_ADAPTER, 1, 0, 0, NO_ADAPTER, 1, 1];
    let segments = vec![
        Segment {
            start: 0,
            len: 2,
            adapter: 1,
        },
        Segment {
            start: 4,
            len: 5,
            adapter: 0,
        },
    ];
    for mapping in [
        Mapping::PerRow(table.clone()),
        Mapping::Grouped(table.clone()),
        Mapping::Fused(table.clone()),
        Mapping::FusedGrouped(table.clone()),
        Mapping::Segments(segments.clone()),
    ] {
        out.push(Case::single(9, 999, 77, &[16, 8], mapping));
    }
    let heavy = heavy_decode_table(45);
    for mapping in [
        Mapping::PerRow(heavy.clone()),
        Mapping::Grouped(heavy.clone()),
        Mapping::Fused(heavy.clone()),
        Mapping::FusedGrouped(heavy),
    ] {
        out.push(Case::single(45, 1000, 333, &[8, 16, 64, 128], mapping));
    }
    // Stacked q/k/v (widths 300, 40, 40) and gate/up (two of 200): one adapter has factors for
    // every part, one only for the first and last (PEFT's default q_proj/v_proj), one of rank
    // 128 in every part (the largest concatenated rank, 384).
    let qkv = (
        vec![300, 40, 40],
        vec![vec![16, 16, 16], vec![8, 0, 8], vec![128, 128, 128]],
    );
    let gate_up = (
        vec![200, 200],
        vec![vec![16, 16], vec![0, 64], vec![128, 128]],
    );
    let table3: Vec<u32> = (0..12u32)
        .map(|r| if r % 4 == 3 { NO_ADAPTER } else { r % 3 })
        .collect();
    let segments3 = vec![
        Segment {
            start: 0,
            len: 5,
            adapter: 1,
        },
        Segment {
            start: 6,
            len: 6,
            adapter: 2,
        },
        Segment {
            start: 12,
            len: 1,
            adapter: 0,
        },
    ];
    // Ranks above MAX_RANK (a `cat` merge of large adapters), in passes of slices: a lone
    // projection with one adapter under the limit, one just over it and one of three passes;
    // stacked, one adapter over it in the first and last parts and none in the middle.
    let over = (vec![200], vec![vec![8], vec![129], vec![300]]);
    let over_qkv = (
        vec![100, 20, 20],
        vec![vec![16, 16, 16], vec![200, 0, 256], vec![8, 0, 8]],
    );
    for ((parts, ranks), in_features) in [(qkv, 512), (gate_up, 999), (over, 260), (over_qkv, 96)] {
        for mapping in [
            Mapping::PerRow(table3.iter().copied().chain([0]).collect()),
            Mapping::Grouped(table3.iter().copied().chain([1]).collect()),
            Mapping::Fused(table3.iter().copied().chain([2]).collect()),
            Mapping::FusedGrouped(table3.iter().copied().chain([0]).collect()),
            Mapping::Segments(segments3.clone()),
        ] {
            out.push(Case {
                short_expand: false,
                ignore_stride: false,
                drop_first_part: false,
                rows: 13,
                in_features,
                parts: parts.clone(),
                ranks: ranks.clone(),
                mapping,
            });
        }
    }
    out
}

fn check_all<T: Act>() {
    for (k, case) in cases().iter().enumerate() {
        for pad in [0, 7] {
            let (err, changed) = run::<T>(case, 100 + k as u64, pad);
            assert!(
                err <= T::TOLERANCE && changed == 0,
                "{} case {k} ({:?}, parts {:?}, ranks {:?}, {pad} columns beyond y): relative \
                 error {err:.2e} (bound {:.0e}), {changed} elements outside the products changed",
                T::SUFFIX,
                case.mapping_name(),
                case.parts,
                case.ranks,
                T::TOLERANCE
            );
        }
    }
}

#[test]
fn lora_kernels_f32_match_the_reference() {
    check_all::<f32>();
}

#[test]
fn lora_kernels_bf16_match_the_reference() {
    check_all::<half::bf16>();
}

#[test]
fn lora_kernels_f16_match_the_reference() {
    check_all::<half::f16>();
}

#[test]
fn an_unknown_kernel_is_refused() {
    let err = unsafe { launch("medley_nothing", ((1, 1, 1), (1, 1, 1), 0), &mut []) };
    assert!(err.is_err());
}

/// The check can fail: a grouped expand launched over one output block too few leaves the last
/// outputs of every mapped row unwritten, and a fused launch one block short the last outputs
/// of the last row; the comparison sees both.
#[test]
fn a_short_launch_is_caught() {
    for case in cases()
        .into_iter()
        .filter(|c| {
            matches!(
                c.mapping,
                Mapping::Grouped(_) | Mapping::Fused(_) | Mapping::FusedGrouped(_)
            )
        })
        .take(3)
    {
        let name = case.mapping_name();
        let short = Case {
            short_expand: true,
            ..case
        };
        let (err, changed) = run::<f32>(&short, 7, 0);
        assert!(err > 1e-3 && changed == 0, "{name}: {err} {changed}");
    }
}

/// The check can fail: expand kernels told that `y`'s rows are `out` apart when they are
/// further apart write into the columns beyond `out` (and miss later rows' own), and the
/// comparison sees both.
#[test]
fn a_wrong_row_stride_is_caught() {
    for case in cases().into_iter().take(5) {
        let name = case.mapping_name();
        let wrong = Case {
            ignore_stride: true,
            ..case
        };
        let (err, changed) = run::<f32>(&wrong, 7, 7);
        assert!(err > 1e-3 && changed > 0, "{name}: {err} {changed}");
        assert_eq!(run::<f32>(&wrong, 7, 0).1, 0, "{name}: no padding, no harm");
    }
}

/// The check can fail: a stacked call whose kernels skip one part of an adapter (its rank
/// given to them as 0) misses that part's product and shifts the others' rows of the
/// intermediate, and the comparison sees it.
#[test]
fn a_stacked_call_missing_a_part_is_caught() {
    for case in cases().into_iter().filter(|c| c.parts.len() > 1) {
        let name = case.mapping_name();
        let dropped = Case {
            drop_first_part: true,
            ..case
        };
        let (err, _) = run::<f32>(&dropped, 7, 0);
        assert!(err > 1e-3, "{name} {:?}: {err}", dropped.parts);
    }
}
