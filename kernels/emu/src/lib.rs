//! Medley's CUDA kernels run on the CPU: the CUDA C sources of `kernels/cuda` compiled as C++
//! against an emulation of the CUDA execution model (`cpp/cuda_emu.h`: a launch runs its blocks
//! in turn and each block's threads as OS threads, with barriers for `__syncthreads` and an
//! exchange buffer for warp shuffles). Tests drive the kernels through [`launch`] with the same
//! launch shapes the GPU launchers compute (`medley_kernels::launch`) and compare them with the
//! reference loops, so that a kernel's indexing and arithmetic are checked on every CI run, not
//! only on the rare runs with a GPU. Speed, coalescing and races between blocks are out of its
//! reach.

use std::ffi::{CString, c_void};

unsafe extern "C" {
    fn medley_emu_launch_lora(
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

/// Runs kernel `name` of `kernels/cuda/lora.cu` over `shape` on the CPU, blocking until it is
/// done. `params[i]` points to the value of the kernel's `i`-th parameter (as for
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
    // caller vouches for `params`.
    let rc = unsafe {
        medley_emu_launch_lora(
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
