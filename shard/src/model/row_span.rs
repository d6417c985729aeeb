//! Where the rows of a 2-D tensor view lie in its storage, for kernels that take a row stride:
//! each row contiguous, rows at any stride at least as wide as a row (a column range of a
//! wider output, such as q of a stacked q/k/v product, or a whole contiguous tensor).

use candle_core::Layout;

/// The rows of a `[rows, width]` view: its first element, the element after its last, and the
/// distance between row starts, all in elements of its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowSpan {
    /// Rows.
    pub rows: usize,
    /// Elements of each row.
    pub width: usize,
    /// Offset of the first row's first element.
    pub start: usize,
    /// Offset after the last row's last element.
    pub end: usize,
    /// Elements from one row's start to the next (`width` when the view is contiguous).
    pub stride: usize,
}

impl RowSpan {
    /// The span of `layout` (2-D), or `None` when a row is not contiguous or rows overlap.
    pub fn of(layout: &Layout) -> Option<Self> {
        let (rows, width) = layout.shape().dims2().ok()?;
        let stride = layout.stride();
        if width > 1 && stride[1] != 1 {
            return None;
        }
        let row_stride = if rows > 1 { stride[0] } else { width };
        if row_stride < width {
            return None;
        }
        let start = layout.start_offset();
        let end = start + rows.saturating_sub(1) * row_stride + if rows > 0 { width } else { 0 };
        Some(Self {
            rows,
            width,
            start,
            end,
            stride: row_stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn span(t: &Tensor) -> Option<RowSpan> {
        RowSpan::of(t.layout())
    }

    #[test]
    fn contiguous_tensors_and_column_ranges_have_spans() {
        let t = Tensor::zeros((4, 10), DType::F32, &Device::Cpu).unwrap();
        let whole = span(&t).unwrap();
        assert_eq!((whole.start, whole.end, whole.stride), (0, 40, 10));
        let cols = t.narrow(1, 3, 5).unwrap();
        let s = span(&cols).unwrap();
        assert_eq!(
            (s.rows, s.width, s.start, s.end, s.stride),
            (4, 5, 3, 38, 10)
        );
        let last_rows = cols.narrow(0, 2, 2).unwrap();
        let s = span(&last_rows).unwrap();
        assert_eq!((s.start, s.end, s.stride), (23, 38, 10));
        let one = cols.narrow(0, 1, 1).unwrap();
        assert_eq!(span(&one).unwrap().stride, 5);
        let none = cols.narrow(0, 0, 0).unwrap();
        assert_eq!(span(&none).unwrap().end, 3);
    }

    #[test]
    fn transposed_and_broadcast_views_have_none() {
        let t = Tensor::zeros((4, 10), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(span(&t.t().unwrap()), None);
        let row = Tensor::zeros((1, 10), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(span(&row.broadcast_as((3, 10)).unwrap()), None);
        let col = Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(span(&col).is_some());
        assert_eq!(
            span(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()),
            None
        );
    }
}
