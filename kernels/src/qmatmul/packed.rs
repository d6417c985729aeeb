//! [`Packed`]: GGML blocks rearranged for the kernels, 4 rows at a time.

use super::{BLOCK, NR, QFormat, f16_to_f32};
use crate::KernelError;

/// A `[rows, cols]` matrix of GGML blocks (Q4_0, Q4_1, Q8_0) in the layout the kernels read.
///
/// Rows are taken in groups of `NR` (4; the last group repeats the last row to fill it). A
/// group holds its blocks in order, and each block of a group is the 4 rows' scales together
/// (`d0 d1 d2 d3` as halves; for Q4_1 the pairs `d0 m0 d1 m1 d2 m2 d3 m3`) followed by the 4
/// rows' level bytes as GGML stores them (16 bytes per row for the 4-bit formats, 32 for Q8_0).
/// A block takes the same bytes as in GGML, so the memory is the file's (plus at most 3 rows).
///
/// Why: the direct kernel reads one stream instead of 4, converts the 4 rows' scales with one
/// load, and takes two rows' nibbles in one 256-bit load (see `x86.rs`).
#[derive(Debug, Clone)]
pub struct Packed {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QFormat {
    /// Bytes of one block's scales (`d`, and `m` for Q4_1).
    pub(crate) const fn scale_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 4,
            Self::Q4_0 | Self::Q8_0 => 2,
        }
    }

    /// Bytes of one block's levels.
    pub(crate) const fn level_bytes(self) -> usize {
        self.block_bytes() - self.scale_bytes()
    }

    /// The 32 integer levels of a block, as f32, from its level bytes.
    pub(super) fn levels(self, qs: &[u8], q: &mut [f32; BLOCK]) {
        match self {
            Self::Q4_0 | Self::Q4_1 => {
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0f) as f32;
                    q[j + 16] = (qs[j] >> 4) as f32;
                }
            }
            Self::Q8_0 => {
                for (v, b) in q.iter_mut().zip(&qs[..BLOCK]) {
                    *v = *b as i8 as f32;
                }
            }
        }
    }

    /// A block's scale and offset from its scale bytes: weight `j` is `d * q_j + m` for the
    /// levels [`QFormat::levels`] gives.
    pub(super) fn scale(self, s: &[u8]) -> (f32, f32) {
        let d = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
        match self {
            Self::Q4_0 => (d, -8.0 * d),
            Self::Q4_1 => (d, f16_to_f32(u16::from_le_bytes([s[2], s[3]]))),
            Self::Q8_0 => (d, 0.0),
        }
    }
}

impl Packed {
    /// Repacks `blocks`, a `[rows, cols]` matrix in GGML's layout (each row `cols / 32` blocks,
    /// as a GGUF file stores it).
    pub fn new(
        format: QFormat,
        rows: usize,
        cols: usize,
        blocks: &[u8],
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::NotWholeBlocks { in_features: cols });
        }
        let (bb, sb, lb) = (
            format.block_bytes(),
            format.scale_bytes(),
            format.level_bytes(),
        );
        let nb = cols / BLOCK;
        let row_bytes = nb * bb;
        crate::check_lengths(&[("W", blocks.len(), rows.saturating_mul(row_bytes))])?;
        let groups = rows.div_ceil(NR);
        let mut data = vec![0u8; groups * NR * row_bytes];
        for (g, group) in data.chunks_exact_mut(NR * row_bytes).enumerate() {
            for (b, out) in group.chunks_exact_mut(NR * bb).enumerate() {
                let (scales, levels) = out.split_at_mut(NR * sb);
                for i in 0..NR {
                    let r = (g * NR + i).min(rows - 1);
                    let block = &blocks[r * row_bytes + b * bb..][..bb];
                    scales[i * sb..(i + 1) * sb].copy_from_slice(&block[..sb]);
                    levels[i * lb..(i + 1) * lb].copy_from_slice(&block[sb..]);
                }
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// The block format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Rows (`N` of a product).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (`K` of a product).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes of one group of [`NR`] rows.
    pub(super) fn group_bytes(&self) -> usize {
        NR * self.cols / BLOCK * self.format.block_bytes()
    }

    /// The groups `a..b` (of [`NR`] rows each).
    pub(super) fn groups(&self, a: usize, b: usize) -> &[u8] {
        &self.data[a * self.group_bytes()..b * self.group_bytes()]
    }

    /// Dequantizes row `r` into `out` (`cols` values; `d q + m`, what a full dequantization
    /// gives): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows {
            return Err(KernelError::RowOutOfRange {
                row: r,
                rows: self.rows,
            });
        }
        crate::check_lengths(&[("out", out.len(), self.cols)])?;
        let group = self.groups(r / NR, r / NR + 1);
        dequantize_group_row(self.format, group, r % NR, &mut out[..self.cols]);
        Ok(())
    }
}

/// Row `i` of one group (`group`: its bytes) into `out` (`cols` values), portably.
pub(super) fn dequantize_group_row(format: QFormat, group: &[u8], i: usize, out: &mut [f32]) {
    let (bb, sb, lb) = (
        format.block_bytes(),
        format.scale_bytes(),
        format.level_bytes(),
    );
    let mut q = [0f32; BLOCK];
    for (block, out) in group.chunks_exact(NR * bb).zip(out.chunks_exact_mut(BLOCK)) {
        let (d, m) = format.scale(&block[i * sb..]);
        format.levels(&block[NR * sb + i * lb..], &mut q);
        for (o, q) in out.iter_mut().zip(&q) {
            *o = q.mul_add(d, m);
        }
    }
}
