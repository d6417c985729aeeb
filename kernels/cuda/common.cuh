// Helpers shared by Medley's CUDA kernels: conversions between the activation types and f32,
// and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of `v` over the warp, in every lane.
__device__ __forceinline__ float warp_sum_all(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Four consecutive values, aligned so that one load instruction reads them (16 bytes of f32, 8
// of bf16/f16).
template <typename T> struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T> __device__ __forceinline__ Vec4<T> load4(const T* p) {
  return *reinterpret_cast<const Vec4<T>*>(p);
}

// x · a over four values, in f32.
template <typename T>
__device__ __forceinline__ float dot4(const Vec4<T>& x, const Vec4<float>& a) {
  return to_f32(x.v[0]) * a.v[0] + to_f32(x.v[1]) * a.v[1] + to_f32(x.v[2]) * a.v[2] +
         to_f32(x.v[3]) * a.v[3];
}

// Whether `p` is a multiple of `bytes` (a power of two).
__device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Whether rows of `n` values of x (type T) and of A (f32) starting at xr and ar can be read four
// values at a time: n a multiple of 4 and both rows aligned to four values.
template <typename T>
__device__ __forceinline__ bool rows_by_four(const T* xr, const float* ar, uint32_t n) {
  return n % 4 == 0 && aligned_to(xr, 4 * sizeof(T)) && aligned_to(ar, 16);
}
