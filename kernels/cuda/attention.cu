// Paged attention on the GPU over the shard's KV block pool, for a whole ragged batch in one
// launch per layer (prefill chunks and decode rows alike), plus the write of a step's keys and
// values into the pool. f32, bf16 and f16 activations; arithmetic in f32.
//
// The pool (shard/src/kv_cache): per layer K and V, each [slots, kv_heads, d] with
// slot = block * block_tokens + position % block_tokens.
//
// The step index (one u32 buffer uploaded once per step, read by every layer):
//   index[0 .. rows)              slot of each row's new key/value
//   index[rows .. 2 rows)         chunk (sequence) of each row
//   index[2 rows .. 3 rows)       position of each row
//   index[3 rows + c * stride ..) block table of chunk c (stride entries, the used ones first)
//
// kv_write: grid (rows), block 256: pool[slot[r], :] = src[r, :] (kv_heads * d elements).
// rope_kv_write: the rotary embedding of the queries and keys and the KV write in one launch
//   (see below).
// attention: grid (rows, heads), block 32 * ATTN_WARPS. Row r, query head h (kv head
//   h / (heads / kv_heads)) attends to the keys of its sequence at positions lo..=pos (lo > 0
//   only with a sliding window), which earlier steps and this step's kv_write put in the pool.
//   Each warp takes every ATTN_WARPS-th key: a coalesced dot product (lanes over d), then an
//   online softmax (running max and sum) with the weighted values accumulated in registers;
//   the warps' partial results are merged through shared memory. Every element of out is
//   written exactly once.

#include <math.h>
#include <stdint.h>

#include "common.cuh"

#define ATTN_WARPS 4
#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)

template <typename T>
__device__ void kv_write(const T* __restrict__ src, T* __restrict__ pool,
                         const uint32_t* __restrict__ index, uint32_t width) {
  const uint32_t r = blockIdx.x;
  const size_t slot = index[r];
  for (uint32_t e = threadIdx.x; e < width; e += blockDim.x)
    pool[slot * width + e] = src[(size_t)r * width + e];
}

// rope_kv_write: grid (rows), block 256. Row r, with cos/sin row r and KV slot index[r]:
//   q_out[r, h, :]       = rope(q[r, h, :]) for the query heads h,
//   kpool[slot, g, :]    = rope(k[r, g, :]) and vpool[slot, g, :] = v[r, g, :] for the kv heads g,
//   rope(x)[i]           = T(T(x[i] cos[i]) - T(x[i + d/2] sin[i])),
//   rope(x)[i + d/2]     = T(T(x[i + d/2] cos[i]) + T(x[i] sin[i])) for i < d/2:
//   transformers' `x * cos + rotate_half(x) * sin`, each product and the sum rounded to T (in f32
//   too: no fused multiply-add). The rows of q, k and v start q_stride, k_stride and v_stride
//   elements apart, so they may be column ranges of one fused projection. One launch does what
//   two rotations and two KV writes did.
template <typename T>
__device__ void rope_kv_write(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ cos,
                              const T* __restrict__ sin, T* __restrict__ q_out,
                              T* __restrict__ kpool, T* __restrict__ vpool,
                              const uint32_t* __restrict__ index, uint32_t q_stride,
                              uint32_t k_stride, uint32_t v_stride, uint32_t heads,
                              uint32_t kv_heads, uint32_t d) {
  const uint32_t r = blockIdx.x, half = d / 2;
  const size_t slot = index[r];
  const T* cr = cos + (size_t)r * half;
  const T* sr = sin + (size_t)r * half;
  const uint32_t pairs = (heads + kv_heads) * half;
  for (uint32_t j = threadIdx.x; j < pairs; j += blockDim.x) {
    const uint32_t h = j / half, i = j % half;
    const T* x;
    T* o;
    if (h < heads) {
      x = q + (size_t)r * q_stride + (size_t)h * d;
      o = q_out + ((size_t)r * heads + h) * d;
    } else {
      const uint32_t g = h - heads;
      x = k + (size_t)r * k_stride + (size_t)g * d;
      o = kpool + (slot * kv_heads + g) * d;
    }
    const float c = to_f32(cr[i]), s = to_f32(sr[i]);
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    const float x1c = to_f32(from_f32<T>(__fmul_rn(x1, c)));
    const float x2s = to_f32(from_f32<T>(__fmul_rn(x2, s)));
    const float x2c = to_f32(from_f32<T>(__fmul_rn(x2, c)));
    const float x1s = to_f32(from_f32<T>(__fmul_rn(x1, s)));
    o[i] = from_f32<T>(__fsub_rn(x1c, x2s));
    o[i + half] = from_f32<T>(__fadd_rn(x2c, x1s));
  }
  const uint32_t width = kv_heads * d;
  for (uint32_t e = threadIdx.x; e < width; e += blockDim.x)
    vpool[slot * width + e] = v[(size_t)r * v_stride + e];
}

template <typename T>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ kc,
                                const T* __restrict__ vc, T* __restrict__ out,
                                const uint32_t* __restrict__ index, uint32_t rows, uint32_t heads,
                                uint32_t kv_heads, uint32_t d, uint32_t block_tokens,
                                uint32_t table_stride, uint32_t window, float scale) {
  __shared__ float sm_m[ATTN_WARPS];
  __shared__ float sm_l[ATTN_WARPS];
  __shared__ float sm_acc[ATTN_WARPS][MAX_HEAD_DIM];
  const uint32_t r = blockIdx.x, h = blockIdx.y;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t chunk = index[rows + r], pos = index[2 * rows + r];
  const uint32_t* table = index + 3 * (size_t)rows + (size_t)chunk * table_stride;
  const uint32_t kvh = h / (heads / kv_heads);
  const T* qr = q + ((size_t)r * heads + h) * d;

  float qv[PER_LANE], acc[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const uint32_t e = lane + 32 * i;
    qv[i] = e < d ? to_f32(qr[e]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const uint32_t lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
  for (uint32_t j = lo + warp; j <= pos; j += ATTN_WARPS) {
    const size_t slot = (size_t)table[j / block_tokens] * block_tokens + j % block_tokens;
    const size_t base = (slot * kv_heads + kvh) * d;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const uint32_t e = lane + 32 * i;
      if (e < d) s += qv[i] * to_f32(kc[base + e]);
    }
    s = warp_sum_all(s) * scale;
    const float m_new = fmaxf(m, s);
    const float c = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * c + p;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const uint32_t e = lane + 32 * i;
      if (e < d) acc[i] = acc[i] * c + p * to_f32(vc[base + e]);
    }
    m = m_new;
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const uint32_t e = lane + 32 * i;
    if (e < d) sm_acc[warp][e] = acc[i];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, sm_m[w]);
  float sum = 0.f;
  for (int w = 0; w < ATTN_WARPS; ++w)
    if (sm_m[w] > -INFINITY) sum += sm_l[w] * expf(sm_m[w] - mx);
  T* o = out + ((size_t)r * heads + h) * d;
  for (uint32_t e = threadIdx.x; e < d; e += blockDim.x) {
    float a = 0.f;
    for (int w = 0; w < ATTN_WARPS; ++w)
      if (sm_m[w] > -INFINITY) a += sm_acc[w][e] * expf(sm_m[w] - mx);
    o[e] = from_f32<T>(a / sum);
  }
}

#define ATTENTION_ENTRY_POINTS(SUFFIX, T)                                                      \
  extern "C" __global__ void medley_kv_write_##SUFFIX(const T* src, T* pool,                    \
                                                      const uint32_t* index, uint32_t width) {  \
    kv_write<T>(src, pool, index, width);                                                       \
  }                                                                                             \
  extern "C" __global__ void medley_rope_kv_write_##SUFFIX(                                    \
      const T* q, const T* k, const T* v, const T* cos, const T* sin, T* q_out, T* kpool,       \
      T* vpool, const uint32_t* index, uint32_t q_stride, uint32_t k_stride, uint32_t v_stride, \
      uint32_t heads, uint32_t kv_heads, uint32_t d) {                                          \
    rope_kv_write<T>(q, k, v, cos, sin, q_out, kpool, vpool, index, q_stride, k_stride,        \
                     v_stride, heads, kv_heads, d);                                             \
  }                                                                                             \
  extern "C" __global__ void medley_paged_attention_##SUFFIX(                                   \
      const T* q, const T* kc, const T* vc, T* out, const uint32_t* index, uint32_t rows,       \
      uint32_t heads, uint32_t kv_heads, uint32_t d, uint32_t block_tokens,                     \
      uint32_t table_stride, uint32_t window, float scale) {                                    \
    paged_attention<T>(q, kc, vc, out, index, rows, heads, kv_heads, d, block_tokens,           \
                       table_stride, window, scale);                                            \
  }

ATTENTION_ENTRY_POINTS(f32, float)
ATTENTION_ENTRY_POINTS(bf16, __nv_bfloat16)
ATTENTION_ENTRY_POINTS(f16, __half)
