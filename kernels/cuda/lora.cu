// Batched multi-adapter LoRA on the GPU: the four entry points of `medley_kernels::LoraKernels`
// (SGMV / BGMV shrink and expand) for f32, bf16 and f16 activations, accumulating in f32. The
// LoRA factors are f32 whatever the activations (the shard keeps them in f32, as PEFT does).
//
// Layouts (row-major), as in kernels/src/lib.rs:
//   x: [rows, in]      y: [rows, out]      t: [rows, t_stride] (f32)
//   per adapter i:  A_i: [rank_i, in]   B_i^T (scale folded in): [rank_i, out]   (f32)
// Adapters are passed as device arrays of pointers (`a`, `b_t`) and ranks (`ranks`), indexed by
// the segment's or row's adapter index. A row whose index is NO_ADAPTER (0xffffffff) is skipped.
//
// Shrink: one warp per (row, j): t[row, j] = dot(x[row, :], A_i[j, :]), lanes striding `in`
//   (coalesced), then a warp reduction. Block = 8 warps = 8 consecutive j of one row (BGMV) or of
//   SGMV_ROWS consecutive rows of one segment, which the block walks (SGMV: A_i's rows stay hot
//   in L1 across them; the third grid dimension spreads a long segment over many blocks).
// Expand: one thread per (row, o): y[row, o] += sum_j t[row, j] * B_i^T[j, o]; t's row is staged
//   in shared memory, B^T reads are coalesced over o. SGMV blocks walk SGMV_ROWS rows of a segment.
//
// Every (row, j < rank_i) of t and every (row, o) of y of a mapped row is written exactly once;
// nothing else is touched.

#include <stdint.h>

#define NO_ADAPTER 0xffffffffu
#define WARPS 8
#define MAX_RANK 128
#define EXPAND_THREADS 256
#define SGMV_ROWS 4

#include "common.cuh"

// t[row, j] for the warp's j (if j < rank): a coalesced dot product over `in`.
template <typename T>
__device__ __forceinline__ void shrink_row(const T* __restrict__ x, const float* __restrict__ a,
                                           float* __restrict__ t, uint32_t row, uint32_t j,
                                           uint32_t in, uint32_t t_stride) {
  const T* xr = x + (size_t)row * in;
  const float* ar = a + (size_t)j * in;
  float acc = 0.f;
  for (uint32_t k = threadIdx.x % 32; k < in; k += 32) acc += to_f32(xr[k]) * ar[k];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) t[(size_t)row * t_stride + j] = acc;
}

// y[row, o] += t[row, :rank] . B^T[:rank, o] for the thread's o; `trow` is t's row in shared
// memory.
template <typename T>
__device__ __forceinline__ void expand_row(const float* trow, const float* __restrict__ b_t,
                                           T* __restrict__ y, uint32_t row, uint32_t o,
                                           uint32_t rank, uint32_t out) {
  float acc = 0.f;
  for (uint32_t j = 0; j < rank; ++j) acc += trow[j] * b_t[(size_t)j * out + o];
  T* yp = y + (size_t)row * out + o;
  *yp = from_f32<T>(to_f32(*yp) + acc);
}

// BGMV shrink. grid = (rows, ceil(max_rank / WARPS)), block = 32 * WARPS.
template <typename T>
__device__ void bgmv_shrink(const T* x, const uint32_t* row_adapter, const float* const* a,
                            const uint32_t* ranks, float* t, uint32_t in, uint32_t t_stride) {
  uint32_t row = blockIdx.x;
  uint32_t i = row_adapter[row];
  if (i == NO_ADAPTER) return;
  uint32_t j = blockIdx.y * WARPS + threadIdx.x / 32;
  if (j >= ranks[i]) return;
  shrink_row(x, a[i], t, row, j, in, t_stride);
}

// The rows of a segment that block z of an SGMV launch takes: SGMV_ROWS consecutive ones, so
// that long segments spread over many blocks while each block still reuses its factor rows.
__device__ __forceinline__ void sgmv_rows(const uint32_t* s, uint32_t* r0, uint32_t* r1) {
  uint32_t start = s[0], len = s[1];
  uint32_t first = blockIdx.z * SGMV_ROWS;
  *r0 = start + min(first, len);
  *r1 = start + min(first + SGMV_ROWS, len);
}

// SGMV shrink. segments = [start, len, adapter] triples; grid = (segments, ceil(max_rank /
// WARPS), ceil(longest segment / SGMV_ROWS)), block = 32 * WARPS.
template <typename T>
__device__ void sgmv_shrink(const T* x, const uint32_t* segments, const float* const* a,
                            const uint32_t* ranks, float* t, uint32_t in, uint32_t t_stride) {
  const uint32_t* s = segments + 3 * blockIdx.x;
  uint32_t i = s[2], r0, r1;
  sgmv_rows(s, &r0, &r1);
  uint32_t j = blockIdx.y * WARPS + threadIdx.x / 32;
  if (j >= ranks[i]) return;
  for (uint32_t row = r0; row < r1; ++row) shrink_row(x, a[i], t, row, j, in, t_stride);
}

// BGMV expand. grid = (rows, ceil(out / EXPAND_THREADS)), block = EXPAND_THREADS.
template <typename T>
__device__ void bgmv_expand(const float* t, const uint32_t* row_adapter, const float* const* b_t,
                            const uint32_t* ranks, T* y, uint32_t out, uint32_t t_stride) {
  __shared__ float trow[MAX_RANK];
  uint32_t row = blockIdx.x;
  uint32_t i = row_adapter[row];
  if (i == NO_ADAPTER) return;
  uint32_t rank = ranks[i];
  for (uint32_t j = threadIdx.x; j < rank; j += blockDim.x) trow[j] = t[(size_t)row * t_stride + j];
  __syncthreads();
  uint32_t o = blockIdx.y * blockDim.x + threadIdx.x;
  if (o < out) expand_row(trow, b_t[i], y, row, o, rank, out);
}

// SGMV expand. grid = (segments, ceil(out / EXPAND_THREADS), ceil(longest segment /
// SGMV_ROWS)), block = EXPAND_THREADS.
template <typename T>
__device__ void sgmv_expand(const float* t, const uint32_t* segments, const float* const* b_t,
                            const uint32_t* ranks, T* y, uint32_t out, uint32_t t_stride) {
  __shared__ float trow[MAX_RANK];
  const uint32_t* s = segments + 3 * blockIdx.x;
  uint32_t i = s[2], r0, r1;
  sgmv_rows(s, &r0, &r1);
  uint32_t rank = ranks[i];
  uint32_t o = blockIdx.y * blockDim.x + threadIdx.x;
  for (uint32_t row = r0; row < r1; ++row) {
    __syncthreads();  // the previous row's trow is no longer read
    for (uint32_t j = threadIdx.x; j < rank; j += blockDim.x)
      trow[j] = t[(size_t)row * t_stride + j];
    __syncthreads();
    if (o < out) expand_row(trow, b_t[i], y, row, o, rank, out);
  }
}

#define LORA_ENTRY_POINTS(SUFFIX, T)                                                            \
  extern "C" __global__ void medley_bgmv_shrink_##SUFFIX(                                       \
      const T* x, const uint32_t* row_adapter, const float* const* a, const uint32_t* ranks,        \
      float* t, uint32_t in, uint32_t t_stride) {                                               \
    bgmv_shrink<T>(x, row_adapter, a, ranks, t, in, t_stride);                                  \
  }                                                                                             \
  extern "C" __global__ void medley_sgmv_shrink_##SUFFIX(                                       \
      const T* x, const uint32_t* segments, const float* const* a, const uint32_t* ranks, float* t, \
      uint32_t in, uint32_t t_stride) {                                                         \
    sgmv_shrink<T>(x, segments, a, ranks, t, in, t_stride);                                     \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_expand_##SUFFIX(                                       \
      const float* t, const uint32_t* row_adapter, const float* const* b_t, const uint32_t* ranks,  \
      T* y, uint32_t out, uint32_t t_stride) {                                                  \
    bgmv_expand<T>(t, row_adapter, b_t, ranks, y, out, t_stride);                               \
  }                                                                                             \
  extern "C" __global__ void medley_sgmv_expand_##SUFFIX(                                       \
      const float* t, const uint32_t* segments, const float* const* b_t, const uint32_t* ranks,     \
      T* y, uint32_t out, uint32_t t_stride) {                                                  \
    sgmv_expand<T>(t, segments, b_t, ranks, y, out, t_stride);                                  \
  }

LORA_ENTRY_POINTS(f32, float)
LORA_ENTRY_POINTS(bf16, __nv_bfloat16)
LORA_ENTRY_POINTS(f16, __half)
