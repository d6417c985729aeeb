//! The device a shard computes on: `--device cpu|cuda[:N]|cuda:N:shared`.
//!
//! `cuda` gives rank `r` GPU `r`; `cuda:N` gives rank `r` GPU `N + r` (ordinals as the driver
//! numbers them after `CUDA_VISIBLE_DEVICES`); `cuda:N:shared` puts every rank on GPU `N` (the
//! split model on one GPU, its partial sums exchanged through host shared memory: how a one-GPU
//! machine checks the tensor-parallel GPU path, since NCCL refuses two ranks on one GPU). CUDA needs a binary built with the `cuda` cargo
//! feature (`scripts/cuda/build.sh`); a CPU binary has no CUDA code and links no CUDA library, so
//! asking it for a GPU is a start-up error, as is a CUDA binary on a machine without a usable GPU.

mod memory;

use std::fmt;
use std::str::FromStr;

pub use memory::{DeviceMemory, PoolUsage, memory_info, pool_usage, reset_pool_peak, trim_pool};

/// A `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// NVIDIA GPUs through CUDA; rank `r` uses ordinal `first + r`.
    Cuda {
        /// The ordinal of rank 0's GPU (`cuda` = 0).
        first: usize,
    },
    /// Every rank on the same GPU.
    CudaShared {
        /// The GPU's ordinal.
        ordinal: usize,
    },
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `--device` is malformed.
    #[error("invalid --device `{0}`: expected cpu, cuda, cuda:N or cuda:N:shared")]
    Invalid(String),
    /// CUDA was asked of a binary built without it.
    #[error(
        "--device {requested}: this binary was built without CUDA support; build it with the \
         `cuda` cargo feature (scripts/cuda/build.sh) or run with --device cpu"
    )]
    NotBuilt {
        /// The device asked for.
        requested: DeviceSpec,
    },
    /// The CUDA device could not be opened (no GPU, no driver, ordinal out of range).
    #[error(
        "cannot open CUDA device {ordinal} (rank {rank}): {reason}; check `nvidia-smi`, the \
         NVIDIA driver and CUDA_VISIBLE_DEVICES, or run with --device cpu"
    )]
    Unavailable {
        /// The GPU ordinal.
        ordinal: usize,
        /// The rank that asked for it.
        rank: u32,
        /// What the driver said.
        reason: String,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda { first: 0 }),
            other => {
                let rest = other.strip_prefix("cuda:");
                let (n, shared) = match rest.and_then(|r| r.strip_suffix(":shared")) {
                    Some(n) => (Some(n), true),
                    None => (rest, false),
                };
                n.and_then(|n| n.parse::<usize>().ok())
                    .map(|n| match shared {
                        true => Self::CudaShared { ordinal: n },
                        false => Self::Cuda { first: n },
                    })
                    .ok_or_else(|| DeviceError::Invalid(s.to_string()))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { first: 0 } => f.write_str("cuda"),
            Self::Cuda { first } => write!(f, "cuda:{first}"),
            Self::CudaShared { ordinal } => write!(f, "cuda:{ordinal}:shared"),
        }
    }
}

/// Whether this binary can run on CUDA devices (built with the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Parses a `--device` flag (for clap's `value_parser`).
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        s.parse().map_err(|e: DeviceError| e.to_string())
    }

    /// Whether this binary supports the device kind at all (no device is opened).
    pub fn check_built(self) -> Result<(), DeviceError> {
        match self {
            Self::Cuda { .. } | Self::CudaShared { .. } if !CUDA_BUILT => {
                Err(DeviceError::NotBuilt { requested: self })
            }
            _ => Ok(()),
        }
    }

    /// The GPU ordinal of `rank`, for CUDA.
    pub fn ordinal(self, rank: u32) -> Option<usize> {
        match self {
            Self::Cpu => None,
            Self::Cuda { first } => Some(first + rank as usize),
            Self::CudaShared { ordinal } => Some(ordinal),
        }
    }

    /// Opens the device of `rank`.
    pub fn open(self, rank: u32) -> Result<candle_core::Device, DeviceError> {
        self.check_built()?;
        match self.ordinal(rank) {
            None => Ok(candle_core::Device::Cpu),
            Some(ordinal) => open_cuda(self, ordinal, rank),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(_: DeviceSpec, ordinal: usize, rank: u32) -> Result<candle_core::Device, DeviceError> {
    // cudarc reports driver failures as errors; the unwind guard is for the paths that panic
    // instead (a missing library under dynamic loading, poisoned locks), so that a machine
    // without a GPU gets the same clear error either way.
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
    let unavailable = |reason: String| DeviceError::Unavailable {
        ordinal,
        rank,
        reason,
    };
    match opened {
        Ok(Ok(device)) => {
            if let candle_core::Device::Cuda(dev) = &device {
                // SAFETY: a rank queues every kernel, copy and collective on candle's one stream
                // of its device (the LoRA and attention kernels and NCCL included), so no buffer
                // is shared between streams; cudarc's cross-stream event tracking (an event
                // waited on and recorded for every buffer of every op) then only costs host
                // time. It applies to buffers allocated from here on: all of the model's.
                unsafe { dev.disable_event_tracking() };
                if let Err(e) = memory::keep_freed_memory(dev) {
                    tracing::warn!(ordinal, error = %e, "cannot raise the CUDA memory pool's release threshold");
                }
            }
            Ok(device)
        }
        Ok(Err(e)) => Err(unavailable(explain_driver_error(&e.to_string()))),
        Err(panic) => Err(unavailable(panic_text(panic.as_ref()))),
    }
}

/// The driver's error in words: its first line (candle appends a backtrace) and, for the codes
/// a misconfigured machine produces, what they mean.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn explain_driver_error(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default().trim();
    let meaning = [
        ("CUDA_ERROR_NO_DEVICE", "no CUDA-capable GPU is visible"),
        (
            "CUDA_ERROR_INVALID_DEVICE",
            "there is no GPU with this ordinal",
        ),
        (
            "CUDA_ERROR_INSUFFICIENT_DRIVER",
            "the NVIDIA driver is older than the CUDA 13.0 this binary needs",
        ),
        (
            "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
            "the NVIDIA driver is older than the CUDA 13.0 this binary needs",
        ),
    ]
    .iter()
    .find(|(code, _)| first.contains(code));
    match meaning {
        Some((_, words)) => format!("{words} ({first})"),
        None => first.to_string(),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    requested: DeviceSpec,
    _ordinal: usize,
    _rank: u32,
) -> Result<candle_core::Device, DeviceError> {
    // `open` refuses CUDA on this build before getting here.
    Err(DeviceError::NotBuilt { requested })
}

#[cfg(feature = "cuda")]
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the CUDA driver panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_device_flags() {
        for (text, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("CPU", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda { first: 0 }, "cuda"),
            ("gpu", DeviceSpec::Cuda { first: 0 }, "cuda"),
            ("cuda:0", DeviceSpec::Cuda { first: 0 }, "cuda"),
            ("cuda:3", DeviceSpec::Cuda { first: 3 }, "cuda:3"),
            (
                "cuda:0:shared",
                DeviceSpec::CudaShared { ordinal: 0 },
                "cuda:0:shared",
            ),
            (
                "CUDA:2:Shared",
                DeviceSpec::CudaShared { ordinal: 2 },
                "cuda:2:shared",
            ),
        ] {
            let got: DeviceSpec = text.parse().expect(text);
            assert_eq!(got, spec, "{text}");
            assert_eq!(got.to_string(), shown);
        }
        for bad in [
            "",
            "tpu",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "metal",
            "cuda:shared",
            "cuda::shared",
            "cuda:0:other",
        ] {
            let err = bad.parse::<DeviceSpec>().expect_err(bad).to_string();
            assert!(
                err.contains("cpu, cuda, cuda:N or cuda:N:shared"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn rank_r_uses_gpu_first_plus_r() {
        assert_eq!(DeviceSpec::Cpu.ordinal(3), None);
        assert_eq!(DeviceSpec::Cuda { first: 0 }.ordinal(3), Some(3));
        assert_eq!(DeviceSpec::Cuda { first: 2 }.ordinal(1), Some(3));
        assert_eq!(DeviceSpec::CudaShared { ordinal: 1 }.ordinal(3), Some(1));
    }

    #[test]
    fn driver_errors_are_one_line_in_words() {
        let text = "DriverError(CUDA_ERROR_NO_DEVICE, \"x\")\n   0: backtrace\n   1: more";
        assert_eq!(
            explain_driver_error(text),
            "no CUDA-capable GPU is visible (DriverError(CUDA_ERROR_NO_DEVICE, \"x\"))"
        );
        assert_eq!(explain_driver_error("something else\nbt"), "something else");
        assert_eq!(explain_driver_error(""), "");
    }

    #[test]
    fn cpu_always_opens() {
        assert!(DeviceSpec::Cpu.open(0).expect("cpu").is_cpu());
    }

    /// A CPU build refuses CUDA with a message that says how to get it.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_refuses_cuda_clearly() {
        let err = DeviceSpec::Cuda { first: 0 }
            .open(0)
            .expect_err("no CUDA in this build")
            .to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("scripts/cuda/build.sh"), "{err}");
    }

    /// On a CUDA build, either a GPU opens or the error names the ordinal and the driver's
    /// reason. CI (no GPU, the libcuda stub) sets `MEDLEY_EXPECT_NO_GPU=1` to require the error.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_build_opens_a_gpu_or_says_why_not() {
        let expect_none = std::env::var_os("MEDLEY_EXPECT_NO_GPU").is_some();
        let opened = DeviceSpec::Cuda { first: 0 }.open(0);
        match opened {
            Ok(device) => {
                assert!(
                    !expect_none,
                    "a CUDA device opened under MEDLEY_EXPECT_NO_GPU"
                );
                assert!(device.is_cuda());
            }
            Err(e) => {
                let text = e.to_string();
                assert!(matches!(e, DeviceError::Unavailable { ordinal: 0, .. }));
                assert!(text.contains("cannot open CUDA device 0"), "{text}");
                assert!(text.contains("nvidia-smi"), "{text}");
                assert!(!text.contains('\n'), "one line: {text}");
                if expect_none {
                    assert!(text.contains("no CUDA-capable GPU is visible"), "{text}");
                }
            }
        }
    }
}
