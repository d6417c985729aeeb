//! A small dense row-major `f32` matrix: the tensor type of the merge engine.
//!
//! Values are either owned or borrowed from a shared byte buffer (a memory-mapped `f32`
//! safetensors file), so reading an f32 adapter copies nothing; writing through
//! [`Matrix::data_mut`] turns a borrowed matrix into an owned one first.

use std::sync::Arc;

use thiserror::Error;

/// Immutable bytes that matrices may borrow `f32` values from (e.g. a memory-mapped file).
pub trait SharedBytes: AsRef<[u8]> + Send + Sync {}

impl<T: AsRef<[u8]> + Send + Sync> SharedBytes for T {}

/// Where a matrix's values live.
#[derive(Clone)]
enum Storage {
    Owned(Vec<f32>),
    /// `len` little-endian `f32`s at byte `offset` of `buf` (alignment checked at creation).
    Shared {
        buf: Arc<dyn SharedBytes>,
        offset: usize,
        len: usize,
    },
}

/// A matrix whose data length does not match its shape.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("matrix data has {len} values but shape {rows}x{cols} needs {expected}")]
pub struct ShapeError {
    /// Requested rows.
    pub rows: usize,
    /// Requested columns.
    pub cols: usize,
    /// Length of the data given.
    pub len: usize,
    /// `rows * cols` (saturating).
    pub expected: usize,
}

/// Dense row-major `f32` matrix. The invariant `data().len() == rows * cols` always holds.
#[derive(Clone)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Storage,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("shared", &matches!(self.data, Storage::Shared { .. }))
            .finish()
    }
}

impl PartialEq for Matrix {
    fn eq(&self, other: &Self) -> bool {
        self.shape() == other.shape() && self.data() == other.data()
    }
}

impl Matrix {
    /// Wraps row-major `data` as a `rows x cols` matrix.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, ShapeError> {
        let expected = rows.saturating_mul(cols);
        if data.len() != expected {
            return Err(ShapeError {
                rows,
                cols,
                len: data.len(),
                expected,
            });
        }
        Ok(Self {
            rows,
            cols,
            data: Storage::Owned(data),
        })
    }

    /// Borrows `rows * cols` little-endian `f32`s at byte `offset` of `buf` without copying.
    /// Returns `None` when the range is out of bounds, misaligned for `f32`, or the target is
    /// big-endian (callers then decode into an owned matrix).
    pub fn shared(
        rows: usize,
        cols: usize,
        buf: Arc<dyn SharedBytes>,
        offset: usize,
    ) -> Option<Self> {
        if cfg!(target_endian = "big") {
            return None;
        }
        let len = rows.checked_mul(cols)?;
        let end = offset.checked_add(len.checked_mul(4)?)?;
        let bytes = (*buf).as_ref().get(offset..end)?;
        bytemuck::try_cast_slice::<u8, f32>(bytes).ok()?;
        Some(Self {
            rows,
            cols,
            data: Storage::Shared { buf, offset, len },
        })
    }

    /// Wraps data whose length the caller guarantees to be `rows * cols` (engine outputs).
    pub(crate) fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            rows,
            cols,
            data: Storage::Owned(data),
        }
    }

    /// An all-zero `rows x cols` matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::from_vec(rows, cols, vec![0.0; rows * cols])
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Row-major values.
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Owned(v) => v,
            Storage::Shared { buf, offset, len } => {
                let bytes = &(**buf).as_ref()[*offset..*offset + *len * 4];
                // Bounds and alignment were checked when the matrix was created and `buf` is
                // immutable, so this cannot fail.
                bytemuck::try_cast_slice(bytes).unwrap_or(&[])
            }
        }
    }

    /// Mutable row-major values (a borrowed matrix is copied into an owned one first).
    pub fn data_mut(&mut self) -> &mut [f32] {
        if let Storage::Shared { .. } = self.data {
            self.data = Storage::Owned(self.data().to_vec());
        }
        match &mut self.data {
            Storage::Owned(v) => v,
            Storage::Shared { .. } => &mut [],
        }
    }

    /// Consumes the matrix, returning its row-major values.
    pub fn into_data(self) -> Vec<f32> {
        match self.data {
            Storage::Owned(v) => v,
            Storage::Shared { .. } => self.data().to_vec(),
        }
    }

    /// True when the values are borrowed from a shared buffer.
    pub fn is_shared(&self) -> bool {
        matches!(self.data, Storage::Shared { .. })
    }

    /// Size of the values in bytes (`4 * rows * cols`).
    pub fn byte_size(&self) -> usize {
        self.rows * self.cols * std::mem::size_of::<f32>()
    }

    /// The transpose, as a new matrix.
    pub fn transposed(&self) -> Matrix {
        let data = self.data();
        let mut out = vec![0.0f32; data.len()];
        for (r, row) in data.chunks_exact(self.cols.max(1)).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                out[c * self.rows + r] = v;
            }
        }
        Matrix::from_vec(self.cols, self.rows, out)
    }

    /// Whether every value is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        self.data().iter().all(|v| v.is_finite())
    }

    /// `self @ other` computed in `f32` (used by tests and tools; the engine uses its own kernels).
    pub fn matmul(&self, other: &Matrix) -> Result<Matrix, ShapeError> {
        if self.cols != other.rows {
            return Err(ShapeError {
                rows: other.rows,
                cols: other.cols,
                len: other.data().len(),
                expected: self.cols.saturating_mul(other.cols),
            });
        }
        let mut out = vec![0.0f32; self.rows * other.cols];
        crate::linalg::gemm_f32(
            crate::linalg::MatRef::row_major(self.data(), self.rows, self.cols),
            crate::linalg::MatRef::row_major(other.data(), other.rows, other.cols),
            &mut out,
            1,
        );
        Ok(Matrix::from_vec(self.rows, other.cols, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_checked() {
        assert!(Matrix::new(2, 3, vec![0.0; 6]).is_ok());
        let err = Matrix::new(2, 3, vec![0.0; 5]).unwrap_err();
        assert_eq!(err.expected, 6);
    }

    #[test]
    fn transpose_and_matmul() {
        let a = Matrix::new(2, 3, vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let t = a.transposed();
        assert_eq!(t.shape(), (3, 2));
        assert_eq!(t.data(), &[1., 4., 2., 5., 3., 6.]);
        let p = a.matmul(&t).unwrap();
        assert_eq!(p.data(), &[14., 32., 32., 77.]);
        assert!(a.matmul(&a).is_err());
    }
}
