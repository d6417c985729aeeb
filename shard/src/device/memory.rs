//! A GPU's memory as a shard sees it: the driver's free and total bytes, and the stream-ordered
//! memory pool candle allocates from (its release threshold, its usage and peak, trimming it).
//! Everything here answers `None` on the CPU, which has no such accounting.

/// `Some($op(dev))` when `$device` is a GPU, else `None` (always `None` without the `cuda`
/// feature, where `$op` is not compiled).
macro_rules! on_gpu {
    ($device:expr, $op:path) => {{
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = $device {
            return Some($op(dev));
        }
        let _ = $device;
        None
    }};
}

/// A device's memory, in bytes ([`memory_info`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Not allocated by any process.
    pub free: u64,
    /// The device's whole memory.
    pub total: u64,
}

/// Free and total bytes of `device`'s memory, as the driver reports them (memory the stream's
/// pool keeps for reuse counts as used); `None` on the CPU.
pub fn memory_info(device: &candle_core::Device) -> Option<Result<DeviceMemory, String>> {
    on_gpu!(device, cuda::memory_info)
}

/// What this process has allocated from the device's memory pool, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// In use now.
    pub used: u64,
    /// The most in use at once since the last [`reset_pool_peak`].
    pub peak: u64,
}

/// The current usage of `device`'s memory pool; `None` on the CPU.
pub fn pool_usage(device: &candle_core::Device) -> Option<Result<PoolUsage, String>> {
    on_gpu!(device, cuda::pool_usage)
}

/// Restarts the pool's peak ([`PoolUsage::peak`]) from what is in use now; `None` on the CPU.
pub fn reset_pool_peak(device: &candle_core::Device) -> Option<Result<(), String>> {
    on_gpu!(device, cuda::reset_pool_peak)
}

/// Hands the memory the pool keeps for reuse (a device is opened with the pool keeping what is
/// freed) back to the driver, so that [`memory_info`] counts it as free; `None` on the CPU.
/// Call it with the stream idle.
pub fn trim_pool(device: &candle_core::Device) -> Option<Result<(), String>> {
    on_gpu!(device, cuda::trim_pool)
}

#[cfg(feature = "cuda")]
pub(super) use cuda::keep_freed_memory;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    use super::{DeviceMemory, PoolUsage};

    /// Binds the device's context to this thread and returns its current memory pool.
    fn current_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool, String> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: the device handle is the context's own.
        unsafe { result::device::get_mem_pool(ctx.cu_device()) }.map_err(|e| e.to_string())
    }

    fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64, String> {
        let mut value = 0u64;
        // SAFETY: the pool is the device's current one; the usage attributes are u64.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()) }
            .map_err(|e| e.to_string())?;
        Ok(value)
    }

    fn set(
        pool: sys::CUmemoryPool,
        attr: sys::CUmemPool_attribute,
        value: u64,
    ) -> Result<(), String> {
        let mut value = value;
        // SAFETY: as in `get`; the settable u64 attributes take a u64.
        unsafe { result::mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast()) }
            .map_err(|e| e.to_string())
    }

    /// Raises the release threshold of the device's current memory pool (the one candle's
    /// stream-ordered allocations come from) to its maximum, so memory a step frees stays in
    /// the pool for the next step.
    ///
    /// With the driver's default threshold of 0, every stream synchronisation (one per step,
    /// when the logits are copied to the host) hands the pool's free memory back to the
    /// driver, and the next step's first allocations map it again. The memory stays reserved
    /// to this process either way; sizing the KV cache from the GPU's memory trims the pool
    /// first ([`trim_pool`](super::trim_pool)).
    pub fn keep_freed_memory(dev: &CudaDevice) -> Result<(), String> {
        set(
            current_pool(dev)?,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )
    }

    pub fn memory_info(dev: &CudaDevice) -> Result<DeviceMemory, String> {
        current_pool(dev)?;
        let (free, total) = result::mem_get_info().map_err(|e| e.to_string())?;
        Ok(DeviceMemory {
            free: free as u64,
            total: total as u64,
        })
    }

    pub fn pool_usage(dev: &CudaDevice) -> Result<PoolUsage, String> {
        let pool = current_pool(dev)?;
        Ok(PoolUsage {
            used: get(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            )?,
            peak: get(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            )?,
        })
    }

    pub fn reset_pool_peak(dev: &CudaDevice) -> Result<(), String> {
        // The driver only accepts 0, which restarts the peak from the current usage.
        set(
            current_pool(dev)?,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }

    pub fn trim_pool(dev: &CudaDevice) -> Result<(), String> {
        let pool = current_pool(dev)?;
        // SAFETY: the pool is the device's current one.
        unsafe { result::mem_pool::trim_to(pool, 0) }.map_err(|e| e.to_string())
    }
}
