//! `kernels/cuda/gather.cu` on the CPU emulator: each output row is the table row its index
//! names, bit for bit, for 2- and 4-byte values; an index past the table writes zeros; with the
//! GPU launcher's shape over a width that is not a multiple of the block, every output value is
//! written (the output starts as garbage) and nothing past it.

use medley_kernels::launch::{gather_kernel_name, gather_launch};
use medley_kernels_emu::{launch, param};

const TABLE_ROWS: usize = 9;
const WIDTH: usize = 300;
const IDS: [u32; 6] = [3, 0, 8, 3, 9, u32::MAX];

fn check<W: Copy + PartialEq + std::fmt::Debug>(
    bytes: usize,
    value: impl Fn(usize) -> W,
    zero: W,
    garbage: W,
) {
    let table: Vec<W> = (0..TABLE_ROWS * WIDTH).map(&value).collect();
    let rows = IDS.len();
    // One row of garbage past the output: the kernel must not touch it.
    let mut out = vec![garbage; (rows + 1) * WIDTH];
    let (mut tp, mut ip, mut op) = (table.as_ptr(), IDS.as_ptr(), out.as_mut_ptr());
    let (mut w, mut n) = (WIDTH as u32, TABLE_ROWS as u32);
    let mut params = [
        param(&mut tp),
        param(&mut ip),
        param(&mut op),
        param(&mut w),
        param(&mut n),
    ];
    let (grid, block) = gather_launch(rows as u32, WIDTH as u32);
    let name = gather_kernel_name(bytes).expect("a kernel for this size");
    // SAFETY: the parameters are the kernel's; table holds TABLE_ROWS × WIDTH values, out more
    // than rows × WIDTH, IDS rows.
    unsafe { launch(name, (grid, block, 0), &mut params) }.expect("launch");
    for (r, &id) in IDS.iter().enumerate() {
        let got = &out[r * WIDTH..(r + 1) * WIDTH];
        if (id as usize) < TABLE_ROWS {
            assert_eq!(
                got,
                &table[id as usize * WIDTH..(id as usize + 1) * WIDTH],
                "row {r}"
            );
        } else {
            assert!(
                got.iter().all(|&v| v == zero),
                "row {r}: index {id} past the table"
            );
        }
    }
    assert!(
        out[rows * WIDTH..].iter().all(|&v| v == garbage),
        "written past the output"
    );
}

#[test]
fn two_byte_rows_are_copied_bit_for_bit() {
    check(2, |i| (i as u16).wrapping_mul(40503), 0u16, 0xdeadu16);
}

#[test]
fn four_byte_rows_are_copied_bit_for_bit() {
    // NaN payloads and signed zeros survive: the values are bits, not floats.
    check(
        4,
        |i| (i as u32).wrapping_mul(2_654_435_761) | 0x7f80_0001,
        0u32,
        0xdead_beef,
    );
}

#[test]
fn other_sizes_have_no_kernel() {
    assert_eq!(gather_kernel_name(1), None);
    assert_eq!(gather_kernel_name(8), None);
}
