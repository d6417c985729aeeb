//! A small dense row-major `f32` matrix: the tensor type of the merge engine.

use thiserror::Error;

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

/// Dense row-major `f32` matrix. The invariant `data.len() == rows * cols` always holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
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
        Ok(Self { rows, cols, data })
    }

    /// Wraps data whose length the caller guarantees to be `rows * cols` (engine outputs).
    pub(crate) fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self { rows, cols, data }
    }

    /// An all-zero `rows x cols` matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
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
        &self.data
    }

    /// Mutable row-major values.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the matrix, returning its row-major values.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Size of the values in bytes (`4 * rows * cols`).
    pub fn byte_size(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// The transpose, as a new matrix.
    pub fn transposed(&self) -> Matrix {
        let mut out = vec![0.0f32; self.data.len()];
        for (r, row) in self.data.chunks_exact(self.cols.max(1)).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                out[c * self.rows + r] = v;
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data: out,
        }
    }

    /// Whether every value is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// `self @ other` computed in `f32` (used by tests and tools; the engine uses its own kernels).
    pub fn matmul(&self, other: &Matrix) -> Result<Matrix, ShapeError> {
        if self.cols != other.rows {
            return Err(ShapeError {
                rows: other.rows,
                cols: other.cols,
                len: other.data.len(),
                expected: self.cols.saturating_mul(other.cols),
            });
        }
        let mut out = Matrix::zeros(self.rows, other.cols);
        crate::linalg::gemm_f32(
            crate::linalg::MatRef::row_major(&self.data, self.rows, self.cols),
            crate::linalg::MatRef::row_major(&other.data, other.rows, other.cols),
            &mut out.data,
            1,
        );
        Ok(out)
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
