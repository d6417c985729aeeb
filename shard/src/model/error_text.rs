//! Candle errors as text for status messages: candle attaches a backtrace to an error when
//! `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`) asks for one, and the error's text then carries
//! every frame (`<unknown>` in a stripped release binary). A client's error message needs the
//! error alone.

use std::fmt;

use candle_core::Error;

/// Displays a candle error without the backtraces candle attached to it or to the errors it
/// wraps.
pub struct Plain<'a>(pub &'a Error);

impl fmt::Display for Plain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Error::WithBacktrace { inner, .. } => Plain(inner).fmt(f),
            Error::Context { inner, context } => write!(f, "{context}: {}", Plain(inner)),
            Error::WithPath { inner, path } => write!(f, "{}: {}", path.display(), Plain(inner)),
            e => e.fmt(f),
        }
    }
}

/// The error codes that mean the device's memory is exhausted: the driver's (candle's
/// allocations), the runtime's and cuBLAS's (its workspace).
const OUT_OF_MEMORY: [&str; 3] = [
    "CUDA_ERROR_OUT_OF_MEMORY",
    "cudaErrorMemoryAllocation",
    "CUBLAS_STATUS_ALLOC_FAILED",
];

/// Whether `e` (or an error it wraps) is the device running out of memory.
pub fn is_out_of_memory(e: &Error) -> bool {
    let text = Plain(e).to_string();
    OUT_OF_MEMORY.iter().any(|code| text.contains(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_told_apart() {
        let oom = Error::Msg(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#.into())
            .context("layer 3");
        assert!(is_out_of_memory(&oom));
        assert!(!is_out_of_memory(&Error::Msg(
            "lora kernels: bad rank".into()
        )));
        let model = crate::model::ModelError::from(oom);
        let text = model.to_string();
        assert!(
            text.starts_with("out of GPU memory (layer 3: DriverError(CUDA_ERROR_OUT_OF_MEMORY"),
            "{text}"
        );
        assert!(text.contains("--num-shard"), "{text}");
    }

    fn with_backtrace(inner: Error) -> Error {
        Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
    }

    #[test]
    fn backtraces_are_left_out_at_every_level() {
        let e = with_backtrace(Error::Msg("lora kernels: bad rank".into()));
        assert!(
            e.to_string().contains('\n'),
            "candle's own text has the frames"
        );
        assert_eq!(Plain(&e).to_string(), "lora kernels: bad rank");
        let e = with_backtrace(e.context("layer 3").with_path("/m/model.safetensors"));
        assert_eq!(
            Plain(&e).to_string(),
            "/m/model.safetensors: layer 3: lora kernels: bad rank"
        );
        let plain = Error::UnexpectedNumberOfDims {
            expected: 2,
            got: 3,
            shape: (1, 2, 3).into(),
        };
        assert_eq!(Plain(&plain).to_string(), plain.to_string());
    }
}
