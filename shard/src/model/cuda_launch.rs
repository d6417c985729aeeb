//! The launch configuration of Medley's CUDA kernels from the `(grid, block)` shapes that
//! `medley_kernels::launch` computes (none of the model's kernels takes dynamic shared memory),
//! the kernels themselves, looked up once per device, and the environment switches that send a
//! kernel family back to candle for comparisons.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use candle_core::CudaDevice;
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};

/// `(grid, block)` as a launch configuration without dynamic shared memory.
pub(crate) fn launch_config(
    (grid_dim, block_dim): ((u32, u32, u32), (u32, u32, u32)),
) -> LaunchConfig {
    LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    }
}

/// Kernels already looked up, by device and name.
static KERNELS: LazyLock<Mutex<HashMap<(DeviceId, &'static str), CudaFunction>>> =
    LazyLock::new(Default::default);

/// Kernel `name` of the PTX module `module` (source `ptx`) on `dev`: loaded through candle the
/// first time, then from a map keyed by the name's literal. A step launches a few hundred
/// kernels; candle's lookup formats nothing but takes its module lock, a C string and a driver
/// call (`cuModuleGetFunction`) each time.
pub(crate) fn kernel(
    dev: &CudaDevice,
    module: &'static str,
    ptx: &'static str,
    name: &'static str,
) -> candle_core::Result<CudaFunction> {
    let key = (dev.id(), name);
    // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
    if let Some(f) = KERNELS.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(f.clone());
    }
    let func: CudaFunction = (*dev.get_or_load_custom_func(name, module, ptx)?).clone();
    KERNELS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, func.clone());
    Ok(func)
}

/// Whether the environment variable `$var` is `$value`, read once per use site (the switches
/// such as `MEDLEY_CUDA_FUSED=off` that turn a CUDA kernel family off for comparisons).
macro_rules! env_is {
    ($var:literal, $value:literal) => {{
        static CELL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CELL.get_or_init(|| std::env::var($var).is_ok_and(|v| v == $value))
    }};
}
pub(crate) use env_is;
