//! Dense linear algebra used by the merge engine: strided matrix views, a safe wrapper around the
//! `gemm` crate, and (in [`svd`]) QR, one-sided Jacobi SVD and the truncated SVD drivers.

pub(crate) mod svd;

/// Scalar types the `gemm` wrapper accepts.
pub(crate) trait Scalar: Copy + Default + 'static + Send + Sync {
    /// Multiplicative identity.
    const ONE: Self;
}

impl Scalar for f32 {
    const ONE: Self = 1.0;
}

impl Scalar for f64 {
    const ONE: Self = 1.0;
}

/// A read-only strided view of a matrix stored in a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows x cols` view of `data`.
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A column-major `rows x cols` view of `data`.
    pub(crate) fn col_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows of the view.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns of the view.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }
}

/// A mutable strided view of a matrix stored in a slice.
pub(crate) struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A row-major `rows x cols` view of `data`.
    pub(crate) fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A column-major `rows x cols` view of `data`.
    pub(crate) fn col_major(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }
}

/// `out = a @ b` (or `out += a @ b` when `accumulate`), using `threads` rayon workers inside `gemm`.
///
/// # Panics
/// On inconsistent shapes or views that do not fit their slices. Callers inside this crate only
/// pass shapes they validated before, so this is an internal invariant, not an input check.
pub(crate) fn gemm<T: Scalar>(
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    out: MatMut<'_, T>,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        a.cols == b.rows && out.rows == a.rows && out.cols == b.cols,
        "gemm shape mismatch: ({}x{}) @ ({}x{}) -> ({}x{})",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        out.rows,
        out.cols
    );
    assert!(
        a.in_bounds() && b.in_bounds() && out.in_bounds(),
        "gemm view out of bounds"
    );
    if out.rows == 0 || out.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..out.rows {
                for c in 0..out.cols {
                    out.data[r * out.row_stride + c * out.col_stride] = T::default();
                }
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee that every index the kernel touches,
    // `(i * rs + j * cs)` for `i < rows`, `j < cols`, lies inside the corresponding slice; the
    // output slice is borrowed mutably and cannot alias the inputs. Strides fit in `isize`
    // because they index live slices.
    unsafe {
        gemm::gemm(
            out.rows,
            out.cols,
            a.cols,
            out.data.as_mut_ptr(),
            out.col_stride as isize,
            out.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out (row-major m x n) = a @ b` in `f32`.
pub(crate) fn gemm_f32(a: MatRef<'_, f32>, b: MatRef<'_, f32>, out: &mut [f32], threads: usize) {
    let (m, n) = (a.rows(), b.cols());
    gemm(a, b, MatMut::row_major(out, m, n), false, threads);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn gemm_matches_naive_with_transposes() {
        let (m, k, n) = (7, 5, 9);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![0.0; m * n];
        gemm(
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            MatMut::row_major(&mut got, m, n),
            false,
            1,
        );
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
        // (b^T a^T)^T = a b: compute b^T @ a^T into a column-major view of the transpose.
        let mut got_t = vec![0.0; m * n];
        gemm(
            MatRef::row_major(&b, k, n).t(),
            MatRef::row_major(&a, m, k).t(),
            MatMut::col_major(&mut got_t, n, m),
            false,
            2,
        );
        for (x, y) in got_t.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
        // Accumulation adds to the destination.
        gemm(
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            MatMut::row_major(&mut got, m, n),
            true,
            1,
        );
        for (x, y) in got.iter().zip(&want) {
            assert!((x - 2.0 * y).abs() < 1e-12);
        }
    }
}
