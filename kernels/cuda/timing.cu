// A kernel for timing others on the GPU alone, without the host's launch overhead (nvbench's
// "blocking kernel"): medley_spin holds its stream for `ns` nanoseconds of the GPU's global
// timer while the host queues the calls to be timed behind it, so that they then run back to
// back and two events around them measure GPU time only. grid (1), block (1).

#include <stdint.h>

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

extern "C" __global__ void medley_spin(uint64_t ns) {
  uint64_t start = global_ns();
  while (global_ns() - start < ns) __nanosleep(1000);
}
