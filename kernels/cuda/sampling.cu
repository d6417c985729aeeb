// Greedy decoding on the device: the argmax of each logits row and its log-probability, so that
// a decode step of greedy sequences reads back two words per row instead of the whole row.
//
// greedy: grid (rows), block 256. For row r of logits [rows, vocab] (f32), with the host
//   sampler's reading of a score (NaN as -inf, never chosen; +inf as the largest finite f32):
//   out[r]        = the lowest index of the row's largest score (0 when every score is -inf);
//   out[rows + r] = the bits of its log-probability, m - (m + ln Σ e^(x - m)) with m that score
//                   (the host's `scores[id] - log_z`, in f32: its sum is over f32 terms).

#include <float.h>
#include <math.h>
#include <stdint.h>

#define GREEDY_THREADS 256

__device__ __forceinline__ float greedy_score(float x) {
  return isnan(x) ? -INFINITY : fminf(x, FLT_MAX);
}

// Whether (v, i) comes before (w, j): a larger score, or the same score at a lower index.
__device__ __forceinline__ bool ahead(float v, uint32_t i, float w, uint32_t j) {
  return v > w || (v == w && i < j);
}

extern "C" __global__ void medley_greedy_f32(const float* logits, uint32_t* out, uint32_t rows,
                                             uint32_t vocab) {
  __shared__ float best_v[GREEDY_THREADS];
  __shared__ uint32_t best_i[GREEDY_THREADS];
  __shared__ float sums[GREEDY_THREADS];
  const uint32_t t = threadIdx.x;
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float v = -INFINITY;
  uint32_t i = UINT32_MAX;
  for (uint32_t e = t; e < vocab; e += GREEDY_THREADS) {
    const float x = greedy_score(row[e]);
    if (ahead(x, e, v, i)) {
      v = x;
      i = e;
    }
  }
  best_v[t] = v;
  best_i[t] = i;
  __syncthreads();
  for (uint32_t half = GREEDY_THREADS / 2; half > 0; half >>= 1) {
    if (t < half && ahead(best_v[t + half], best_i[t + half], best_v[t], best_i[t])) {
      best_v[t] = best_v[t + half];
      best_i[t] = best_i[t + half];
    }
    __syncthreads();
  }
  const float m = best_v[0];
  float sum = 0.f;
  if (m != -INFINITY)
    for (uint32_t e = t; e < vocab; e += GREEDY_THREADS) sum += expf(greedy_score(row[e]) - m);
  sums[t] = sum;
  __syncthreads();
  for (uint32_t half = GREEDY_THREADS / 2; half > 0; half >>= 1) {
    if (t < half) sums[t] += sums[t + half];
    __syncthreads();
  }
  if (t == 0) {
    const float log_z = m == -INFINITY ? m : m + logf(sums[0]);
    const float logprob = m - log_z;
    out[blockIdx.x] = best_i[0] == UINT32_MAX ? 0 : best_i[0];
    out[rows + blockIdx.x] = __float_as_uint(logprob);
  }
}
