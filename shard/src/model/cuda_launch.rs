//! The launch configuration of Medley's CUDA kernels from the `(grid, block)` shapes that
//! `medley_kernels::launch` computes (none of the model's kernels takes dynamic shared memory),
//! and the environment switches that send a kernel family back to candle for comparisons.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

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

/// Whether the environment variable `$var` is `$value`, read once per use site (the switches
/// such as `MEDLEY_CUDA_FUSED=off` that turn a CUDA kernel family off for comparisons).
macro_rules! env_is {
    ($var:literal, $value:literal) => {{
        static CELL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *CELL.get_or_init(|| std::env::var($var).is_ok_and(|v| v == $value))
    }};
}
pub(crate) use env_is;
