// Fused elementwise kernels of a decoder layer in half precision (bf16, f16), each rounding
// where transformers rounds, so that one launch replaces a chain of candle ops:
//
// rms_norm: grid (rows), block 256 (8 warps).
//   out[r] = T(w * T(x * rsqrt(mean(x^2) + eps))), x widened to f32 — LlamaRMSNorm's
//   `hidden.to(f32) * rsqrt(var + eps)`, cast back, times the weight.
// add_rms_norm: grid (rows), block 256: the residual add and the next RMSNorm in one pass.
//   sum[r] = T(x + a) (torch's half-precision add: in f32, rounded), out[r] = rms_norm(sum[r]).
// silu_mul: grid (ceil(n / 256)), block 256.
//   out = T(T(silu(f32(gate))) * up) — `act_fn(gate_proj(x)) * up_proj(x)` with torch's
//   half-precision SiLU (computed in f32, rounded). n = rows × width; gate's and up's rows
//   are `gate_stride` and `up_stride` apart (column ranges of a stacked gate/up product, or
//   width for contiguous ones); out is contiguous.

#include <math.h>
#include <stdint.h>

#include "common.cuh"

#define NORM_THREADS 256

// 1 / sqrt(mean(x^2) + eps) of the block's row, in every thread, from each thread's partial
// sum of squares. Contains a barrier: call it from every thread of the block.
__device__ __forceinline__ float row_inv_rms(float ss, uint32_t hidden, float eps) {
  __shared__ float partial[NORM_THREADS / 32];
  ss = warp_sum_all(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < NORM_THREADS / 32; ++k) total += partial[k];
  return rsqrtf(total / (float)hidden + eps);
}

// o = T(w * T(src * inv)) over the block's row; each thread takes the elements it summed.
template <typename T>
__device__ __forceinline__ void scale_row(const T* __restrict__ src, const T* __restrict__ w,
                                          T* __restrict__ o, uint32_t hidden, float inv) {
  for (uint32_t e = threadIdx.x; e < hidden; e += NORM_THREADS) {
    const T n = from_f32<T>(to_f32(src[e]) * inv);
    o[e] = from_f32<T>(to_f32(w[e]) * to_f32(n));
  }
}

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                         uint32_t hidden, float eps) {
  const T* xr = x + (size_t)blockIdx.x * hidden;
  float ss = 0.f;
  for (uint32_t e = threadIdx.x; e < hidden; e += NORM_THREADS) {
    const float v = to_f32(xr[e]);
    ss += v * v;
  }
  const float inv = row_inv_rms(ss, hidden, eps);
  scale_row(xr, w, out + (size_t)blockIdx.x * hidden, hidden, inv);
}

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ a,
                             const T* __restrict__ w, T* __restrict__ sum, T* __restrict__ out,
                             uint32_t hidden, float eps) {
  const size_t row = (size_t)blockIdx.x * hidden;
  float ss = 0.f;
  for (uint32_t e = threadIdx.x; e < hidden; e += NORM_THREADS) {
    const T s = from_f32<T>(to_f32(x[row + e]) + to_f32(a[row + e]));
    sum[row + e] = s;
    const float v = to_f32(s);
    ss += v * v;
  }
  const float inv = row_inv_rms(ss, hidden, eps);
  scale_row(sum + row, w, out + row, hidden, inv);
}

template <typename T>
__device__ void silu_mul(const T* __restrict__ gate, const T* __restrict__ up,
                         T* __restrict__ out, uint32_t n, uint32_t width, uint32_t gate_stride,
                         uint32_t up_stride) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t r = i / width, c = i % width;
  const float g = to_f32(gate[(size_t)r * gate_stride + c]);
  const T s = from_f32<T>(g / (1.f + expf(-g)));
  out[i] = from_f32<T>(to_f32(s) * to_f32(up[(size_t)r * up_stride + c]));
}

#define FUSED_ENTRY_POINTS(SUFFIX, T)                                                          \
  extern "C" __global__ void medley_rms_norm_##SUFFIX(const T* x, const T* w, T* out,           \
                                                      uint32_t hidden, float eps) {             \
    rms_norm<T>(x, w, out, hidden, eps);                                                        \
  }                                                                                             \
  extern "C" __global__ void medley_add_rms_norm_##SUFFIX(                                      \
      const T* x, const T* a, const T* w, T* sum, T* out, uint32_t hidden, float eps) {         \
    add_rms_norm<T>(x, a, w, sum, out, hidden, eps);                                            \
  }                                                                                             \
  extern "C" __global__ void medley_silu_mul_##SUFFIX(                                          \
      const T* gate, const T* up, T* out, uint32_t n, uint32_t width, uint32_t gate_stride,      \
      uint32_t up_stride) {                                                                     \
    silu_mul<T>(gate, up, out, n, width, gate_stride, up_stride);                               \
  }

FUSED_ENTRY_POINTS(bf16, __nv_bfloat16)
FUSED_ENTRY_POINTS(f16, __half)
