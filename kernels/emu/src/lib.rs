//! Medley's CUDA kernels run on the CPU: the CUDA C sources of `kernels/cuda` (the LoRA, paged
//! attention and fused kernels) compiled as C++ against an emulation of the CUDA execution
//! model (`cpp/cuda_emu.h`: a launch runs its blocks in turn, each block's threads as fibers
//! switched at barriers, warp shuffles through an exchange buffer, a barrier that can never be
//! reached reported as a deadlock). Tests drive the kernels through [`launch`] with the same
//! launch shapes the GPU launchers compute (`medley_kernels::launch`) and compare them with
//! reference loops, so that a kernel's indexing and arithmetic are checked on every CI run, not
//! only on the rare runs with a GPU. Speed, coalescing and races between blocks are out of its
//! reach; the GPU check (`scripts/gpu-check.sh`) still runs the same comparisons on a GPU.

use std::ffi::{CString, c_void};

unsafe extern "C" {
    /// `cpp/emu.cpp`: launches kernel `name` of any emulated source; 1 when none has it.
    fn medley_emu_launch(
        name: *const std::ffi::c_char,
        grid: *const u32,
        block: *const u32,
        shared: usize,
        params: *mut *mut c_void,
    ) -> i32;
}

/// Why a launch did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// No emulated kernel has this name.
    UnknownKernel(String),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownKernel(name) => write!(f, "no emulated kernel is named {name}"),
        }
    }
}

impl std::error::Error for LaunchError {}

/// One launch's shape: grid, block and bytes of dynamic shared memory.
pub type LaunchShape = ((u32, u32, u32), (u32, u32, u32), u32);

/// Runs kernel `name` (an entry point of `kernels/cuda/*.cu`) over `shape` on the CPU, blocking
/// until it is done. `params[i]` points to the value of the kernel's `i`-th parameter (as for
/// `cuLaunchKernel`); device pointers are host pointers here.
///
/// # Safety
/// `params` must match the kernel's parameter list in number and types, and every pointer the
/// kernel dereferences must be valid for what the launch reads and writes.
pub unsafe fn launch(
    name: &str,
    shape: LaunchShape,
    params: &mut [*mut c_void],
) -> Result<(), LaunchError> {
    let ((gx, gy, gz), (bx, by, bz), shared) = shape;
    let c_name = CString::new(name).map_err(|_| LaunchError::UnknownKernel(name.into()))?;
    let grid = [gx, gy, gz];
    let block = [bx, by, bz];
    // SAFETY: the name is NUL-terminated, grid and block hold three values each, and the
    // caller vouches for `params` (no kernel of that name: nothing is read, 1 comes back).
    let rc = unsafe {
        medley_emu_launch(
            c_name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            shared as usize,
            params.as_mut_ptr(),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(LaunchError::UnknownKernel(name.into())),
    }
}

/// A pointer to `value` as a launch parameter.
pub fn param<T>(value: &mut T) -> *mut c_void {
    (value as *mut T).cast()
}

/// An activation type of the kernels.
pub trait Act: Copy {
    /// The kernels' name suffix.
    const SUFFIX: &'static str;
    /// Relative error bound of a kernel against an f64 reference (as `medley-lora-check`'s):
    /// f32 sums against f64; half precision rounds the inputs and the result once.
    const TOLERANCE: f64;
    /// `v` rounded to this type.
    fn from_f32(v: f32) -> Self;
    /// The value, widened.
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    const SUFFIX: &'static str = "f32";
    const TOLERANCE: f64 = 1e-5;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// [`Act`] for a `half` type: its name suffix and bound.
macro_rules! half_act {
    ($t:ty, $suffix:literal, $tolerance:literal) => {
        impl Act for $t {
            const SUFFIX: &'static str = $suffix;
            const TOLERANCE: f64 = $tolerance;
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
        }
    };
}

half_act!(half::bf16, "bf16", 1e-2);
half_act!(half::f16, "f16", 2e-3);
