// Fused elementwise kernels of a decoder layer in half precision (bf16, f16), each rounding
// where transformers rounds, so that one launch replaces a chain of candle ops:
//
// rms_norm: grid (rows), block 256 (8 warps).
//   out[r] = T(w * T(x * rsqrt(mean(x^2) + eps))), x widened to f32 — LlamaRMSNorm's
//   `hidden.to(f32) * rsqrt(var + eps)`, cast back, times the weight.
// silu_mul: grid (ceil(n / 256)), block 256.
//   out = T(T(silu(f32(gate))) * up) — `act_fn(gate_proj(x)) * up_proj(x)` with torch's
//   half-precision SiLU (computed in f32, rounded).

#include <math.h>
#include <stdint.h>

#include "common.cuh"

#define NORM_THREADS 256

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out,
                         uint32_t hidden, float eps) {
  __shared__ float partial[NORM_THREADS / 32];
  const T* xr = x + (size_t)blockIdx.x * hidden;
  T* o = out + (size_t)blockIdx.x * hidden;
  float ss = 0.f;
  for (uint32_t e = threadIdx.x; e < hidden; e += NORM_THREADS) {
    const float v = to_f32(xr[e]);
    ss += v * v;
  }
  ss = warp_sum_all(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < NORM_THREADS / 32; ++k) total += partial[k];
  const float inv = rsqrtf(total / (float)hidden + eps);
  for (uint32_t e = threadIdx.x; e < hidden; e += NORM_THREADS) {
    const T n = from_f32<T>(to_f32(xr[e]) * inv);
    o[e] = from_f32<T>(to_f32(w[e]) * to_f32(n));
  }
}

template <typename T>
__device__ void silu_mul(const T* __restrict__ gate, const T* __restrict__ up,
                         T* __restrict__ out, uint32_t n) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = to_f32(gate[i]);
  const T s = from_f32<T>(g / (1.f + expf(-g)));
  out[i] = from_f32<T>(to_f32(s) * to_f32(up[i]));
}

#define FUSED_ENTRY_POINTS(SUFFIX, T)                                                          \
  extern "C" __global__ void medley_rms_norm_##SUFFIX(const T* x, const T* w, T* out,           \
                                                      uint32_t hidden, float eps) {             \
    rms_norm<T>(x, w, out, hidden, eps);                                                        \
  }                                                                                             \
  extern "C" __global__ void medley_silu_mul_##SUFFIX(const T* gate, const T* up, T* out,       \
                                                      uint32_t n) {                             \
    silu_mul<T>(gate, up, out, n);                                                              \
  }

FUSED_ENTRY_POINTS(bf16, __nv_bfloat16)
FUSED_ENTRY_POINTS(f16, __half)
