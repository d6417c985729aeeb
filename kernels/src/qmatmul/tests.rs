use super::*;

#[test]
fn halves_convert_exactly() {
    for (bits, want) in [
        (0x3c00u16, 1.0f32),
        (0xc000, -2.0),
        (0x0001, 2f32.powi(-24)),
        (0x8400, -(2f32.powi(-14))),
        (0x7bff, 65504.0),
        (0x3555, 0.333_251_95),
        (0x0000, 0.0),
    ] {
        assert_eq!(f16_to_f32(bits), want, "{bits:#06x}");
    }
    assert!(f16_to_f32(0x7c00).is_infinite());
    assert!(f16_to_f32(0x7e00).is_nan());
}

/// xorshift bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect()
}

/// Random blocks whose scales are normal halves between 2^-10 and 2^-4 (either sign for `m`).
fn blocks(format: QFormat, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut w = bytes(n * k / BLOCK * bb, seed);
    for block in w.chunks_exact_mut(bb) {
        let scale = |b: &mut [u8], neg: bool| {
            let exp = 5 + (b[1] % 6) as u16; // 2^(exp - 15)
            let h = (u16::from(neg) << 15) | (exp << 10) | (b[0] as u16 & 0x3ff);
            b[..2].copy_from_slice(&h.to_le_bytes());
        };
        scale(&mut block[0..2], false);
        if format == QFormat::Q4_1 {
            let neg = block[2] & 1 == 1;
            scale(&mut block[2..4], neg);
        }
    }
    w
}

/// The weights of one block, decoded directly from the GGML layout, in f64.
fn dequantize(format: QFormat, block: &[u8]) -> Vec<f64> {
    let h = |i: usize| f16_to_f32(u16::from_le_bytes([block[i], block[i + 1]])) as f64;
    match format {
        QFormat::Q8_0 => block[2..34]
            .iter()
            .map(|b| h(0) * (*b as i8) as f64)
            .collect(),
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let qs = &block[block.len() - 16..];
            let nib = |j: usize| {
                if j < 16 {
                    (qs[j] & 15) as f64
                } else {
                    (qs[j - 16] >> 4) as f64
                }
            };
            (0..32)
                .map(|j| {
                    if format == QFormat::Q4_0 {
                        h(0) * (nib(j) - 8.0)
                    } else {
                        h(0) * nib(j) + h(2)
                    }
                })
                .collect()
        }
    }
}

fn check(format: QFormat, m: usize, n: usize, k: usize) {
    let w = blocks(format, n, k, 7 + m as u64);
    let x: Vec<f32> = bytes(m * k, 3)
        .iter()
        .map(|b| *b as f32 / 64.0 - 2.0)
        .collect();
    let bb = format.block_bytes();
    let dense: Vec<Vec<f64>> = w
        .chunks_exact(k / BLOCK * bb)
        .map(|row| {
            row.chunks_exact(bb)
                .flat_map(|b| dequantize(format, b))
                .collect()
        })
        .collect();
    let shape = Shape {
        rows: m,
        in_features: k,
        out_features: n,
    };
    let w = Packed::new(format, n, k, &w).unwrap();
    for simd in [false, true] {
        let mut y = vec![f32::NAN; m * n];
        qmatmul_nt_with(simd, shape, &x, &w, &mut y).unwrap();
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|c| x[r * k + c] as f64 * dense[j][c]).sum();
                let scale: f64 = (0..k)
                    .map(|c| (x[r * k + c] as f64 * dense[j][c]).abs())
                    .sum::<f64>()
                    .max(1e-30);
                // The AVX2 direct kernel rounds each block of x to 16-bit levels: every value
                // moves by at most max|x_block| / 65534, so the product by at most Σ|w| times that.
                let rounding: f64 = if simd && m <= DIRECT_MAX_ROWS && cfg!(target_arch = "x86_64")
                {
                    (0..k / BLOCK)
                        .map(|b| {
                            let xb = &x[r * k + b * BLOCK..][..BLOCK];
                            let amax = xb.iter().fold(0f64, |a, v| a.max((*v as f64).abs()));
                            let w: f64 =
                                dense[j][b * BLOCK..][..BLOCK].iter().map(|v| v.abs()).sum();
                            amax / 65534.0 * w
                        })
                        .sum()
                } else {
                    0.0
                };
                let got = y[r * n + j] as f64;
                assert!(
                    (got - want).abs() <= rounding + 1e-6 * scale,
                    "{format:?} simd={simd} m={m} row {r} col {j}: {got} vs {want} (rounding bound {rounding})"
                );
            }
        }
    }
}

/// Every format, 1 to 17 rows, against an f64 product with weights decoded independently from
/// the GGML layout: error within f32 rounding (1e-6 of Σ|x w|), plus, for the AVX2 direct
/// kernel, the bound of its 16-bit rounding of `x`.
#[test]
fn products_match_the_dequantized_weights() {
    for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
        // n = 5 and 33: a last group with a repeated row; 1-3 rows direct, 17 dense.
        for (m, n, k) in [(1, 5, 64), (2, 4, 32), (3, 40, 256), (17, 33, 512)] {
            check(format, m, n, k);
        }
    }
}

/// Large enough to run in parallel ranges.
#[test]
fn parallel_ranges_cover_every_column() {
    check(QFormat::Q4_1, 4, 300, 1024);
}

/// The direct kernel's edge cases: an all-zero block of `x` (no scale) contributes nothing, and
/// a non-finite value makes the outputs non-finite, as in f32.
#[test]
fn zero_and_non_finite_activations() {
    let k = 64;
    let n = 4;
    for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
        let w = Packed::new(format, n, k, &blocks(format, n, k, 5)).unwrap();
        let shape = Shape {
            rows: 1,
            in_features: k,
            out_features: n,
        };
        let mut x = vec![0f32; k];
        let mut y = vec![f32::NAN; n];
        qmatmul_nt(shape, &x, &w, &mut y).unwrap();
        assert!(y.iter().all(|v| *v == 0.0), "{format:?} zeros: {y:?}");
        x[40] = f32::NAN;
        qmatmul_nt(shape, &x, &w, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{format:?} NaN: {y:?}");
        x[40] = f32::INFINITY;
        qmatmul_nt(shape, &x, &w, &mut y).unwrap();
        assert!(y.iter().all(|v| !v.is_finite()), "{format:?} inf: {y:?}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(matches!(
        Packed::new(QFormat::Q8_0, 1, 48, &[0; 64]),
        Err(KernelError::NotWholeBlocks { in_features: 48 })
    ));
    assert!(matches!(
        Packed::new(QFormat::Q4_1, 2, 64, &[0; 40]),
        Err(KernelError::BufferTooSmall { .. })
    ));
    let w = Packed::new(QFormat::Q4_1, 2, 64, &blocks(QFormat::Q4_1, 2, 64, 1)).unwrap();
    let shape = |n, k| Shape {
        rows: 1,
        in_features: k,
        out_features: n,
    };
    assert!(matches!(
        qmatmul_nt(shape(3, 64), &[0.0; 64], &w, &mut [0f32; 3]),
        Err(KernelError::WeightShape { .. })
    ));
    assert!(matches!(
        qmatmul_nt(shape(2, 64), &[0.0; 63], &w, &mut [0f32; 2]),
        Err(KernelError::BufferTooSmall { .. })
    ));
    let mut row = [0f32; 64];
    assert!(matches!(
        w.dequantize_row(2, &mut row),
        Err(KernelError::RowOutOfRange { row: 2, rows: 2 })
    ));
}

/// Every packed row dequantizes to the GGML block's weights (independently decoded), whatever
/// its place in a group, the repeated rows of a last group included.
#[test]
fn packed_rows_equal_the_ggml_rows() {
    for format in [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0] {
        let (n, k) = (7, 96);
        let raw = blocks(format, n, k, 11);
        let w = Packed::new(format, n, k, &raw).unwrap();
        assert_eq!(w.bytes(), 8 * k / BLOCK * format.block_bytes());
        let bb = format.block_bytes();
        let mut row = vec![0f32; k];
        let all = w.dequantize();
        assert_eq!(all.len(), n * k);
        for r in 0..n {
            w.dequantize_row(r, &mut row).unwrap();
            assert_eq!(
                row,
                all[r * k..(r + 1) * k],
                "{format:?} row {r}: one row vs all"
            );
            let want: Vec<f64> = raw[r * k / BLOCK * bb..(r + 1) * k / BLOCK * bb]
                .chunks_exact(bb)
                .flat_map(|b| dequantize(format, b))
                .collect();
            for (c, (g, w)) in row.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{format:?} {r},{c}"
                );
            }
        }
    }
}

/// The kernel's `x` lanes take every weight of a block: once per register for Q8_0, and for
/// the 4-bit formats each weight in exactly one register (its 8 levels repeated for two rows).
#[test]
fn lanes_cover_every_weight() {
    let mut q8 = lanes(QFormat::Q8_0).to_vec();
    q8.sort_unstable();
    assert_eq!(q8, (0..32).collect::<Vec<_>>());
    let q4 = lanes(QFormat::Q4_0);
    assert_eq!(q4, lanes(QFormat::Q4_1));
    for reg in q4.chunks_exact(16) {
        assert_eq!(reg[..8], reg[8..]);
    }
    let mut once: Vec<usize> = q4.chunks_exact(16).flat_map(|r| r[..8].to_vec()).collect();
    once.sort_unstable();
    assert_eq!(once, (0..32).collect::<Vec<_>>());
}
