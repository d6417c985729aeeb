//! The launch configuration of Medley's CUDA kernels from the `(grid, block)` shapes that
//! `medley_kernels::launch` computes (none of the model's kernels takes dynamic shared memory).

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
