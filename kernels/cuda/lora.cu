// Batched multi-adapter LoRA on the GPU: the four entry points of `medley_kernels::LoraKernels`
// (SGMV / BGMV shrink and expand) for f32, bf16 and f16 activations, accumulating in f32. The
// LoRA factors are f32 whatever the activations (the shard keeps them in f32, as PEFT does).
//
// One launch pair serves `parts` projections of one input whose outputs sit side by side in y
// (a stacked q/k/v or gate/up product; parts = 1 for a lone projection). Layouts (row-major):
//   x: [rows, in]
//   y: [rows, out], rows `y_stride` apart (y_stride >= out: y may be a column range of a wider
//      output); part p owns columns [col_ends[p - 1], col_ends[p]) (col_ends[-1] = 0,
//      col_ends[parts - 1] = out)
//   per adapter i and part p (entry e = i * parts + p):
//      A_e: [rank_e, in]   B_e^T (scale folded in): [rank_e, width of part p]   (f32)
//      rank_e may be 0: the adapter has no factors for that part, whose columns it leaves alone
//   t: [rows, t_stride] (f32), adapter i's parts' ranks concatenated along j
// Adapters are passed as device arrays of pointers (`a`, `b_t`) and ranks (`ranks`), indexed by
// entry. A row whose adapter index is NO_ADAPTER (0xffffffff) is skipped.
//
// Shrink: one block per (row, j): t[row, j] = dot(x[row, :], A_e[j', :]) for the part and row j'
//   that j falls in, the block's 256 threads striding `in` four values at a time when the rows
//   allow it (one vector load each, else one value), then a block reduction. A decode step's
//   shrink is latency-bound (a few MB over thousands of short dot products): a block per dot
//   product keeps many loads in flight. SGMV blocks walk SGMV_ROWS consecutive rows of one
//   segment for their j (A's row stays hot in L1 across them; the third grid dimension spreads
//   a long segment over many blocks).
// Expand: one thread per (row, o), for the part p that column o falls in:
//   y[row, o] += sum_j' t[row, offset_p + j'] * B_e^T[j', o - start_p]; t's row is staged in
//   shared memory, B^T reads are coalesced over o. SGMV blocks walk SGMV_ROWS rows of a segment.
//
// Every (row, j < total rank of its adapter) of t, and every (row, o) of a mapped row whose part
// has factors, is written exactly once; nothing else is touched (in particular the columns of
// y's rows beyond `out`).

#include <stdint.h>

#define NO_ADAPTER 0xffffffffu
#define WARPS 8
#define MAX_RANK 128
#define MAX_PARTS 3
#define EXPAND_THREADS 256
#define SGMV_ROWS 4

#include "common.cuh"

// Factor values an expand thread loads once for its column (ExpandCol; the fused kernels load
// them before they wait). The fused kernels (shrink and expand in one launch, see below): their
// counters ahead of the per-row (per-adapter) ones, and the longest wait (about 20 s at 1.7 GHz)
// before a launch traps (fails with an error) rather than hang on counters that are wrong.
#define FUSED_PREFETCH 16
#define FUSED_SYNC_WORDS 2
#define SPIN_LIMIT_CYCLES (1ll << 35)

// Waits until *counter reaches target (one thread), then fences so that what the counted
// blocks wrote before counting is visible.
__device__ __forceinline__ void wait_count(const uint32_t* counter, uint32_t target) {
  const volatile uint32_t* c = counter;
  const long long start = clock64();
  while (*c < target) {
    __nanosleep(32);
    if (clock64() - start > SPIN_LIMIT_CYCLES) __trap();
  }
  __threadfence();
}

// A fused launch's ticket: blocks count themselves in the order they start (the first block to
// start takes 0). Contains a barrier.
__device__ __forceinline__ uint32_t take_ticket(uint32_t* sync) {
  __shared__ uint32_t ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(&sync[0], 1u);
  __syncthreads();
  return ticket;
}

// The end of a fused launch's block: the last block to finish clears the launch's `words`
// counters for the next launch on the stream. Contains barriers.
__device__ __forceinline__ void finish_fused(uint32_t* sync, uint32_t words) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&sync[1], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last)
    for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) sync[w] = 0;
}

// The sum of adapter i's ranks over its parts (its row length in t).
__device__ __forceinline__ uint32_t total_rank(const uint32_t* ranks, uint32_t i, uint32_t parts) {
  uint32_t r = 0;
  for (uint32_t p = 0; p < parts; ++p) r += ranks[i * parts + p];
  return r;
}

// The factor entry of adapter i holding j of its concatenated ranks, and j's row within that
// entry's A; false when j is past the adapter's total rank.
__device__ __forceinline__ bool rank_entry(const uint32_t* ranks, uint32_t i, uint32_t parts,
                                           uint32_t j, uint32_t* entry, uint32_t* row) {
  for (uint32_t p = 0; p < parts; ++p) {
    const uint32_t r = ranks[i * parts + p];
    if (j < r) {
      *entry = i * parts + p;
      *row = j;
      return true;
    }
    j -= r;
  }
  return false;
}

// Column o's part: its first column, its width, and the offset of adapter i's ranks for it in
// t's row; the part index is returned.
__device__ __forceinline__ uint32_t column_part(const uint32_t* col_ends, const uint32_t* ranks,
                                                uint32_t i, uint32_t parts, uint32_t o,
                                                uint32_t* start, uint32_t* width,
                                                uint32_t* t_offset) {
  uint32_t p = 0, first = 0, offset = 0;
  while (p + 1 < parts && o >= col_ends[p]) {
    first = col_ends[p];
    offset += ranks[i * parts + p];
    ++p;
  }
  *start = first;
  *width = col_ends[p] - first;
  *t_offset = offset;
  return p;
}

// t[row, j] = x[row, :] · ar (a row of A) by the whole block (WARPS warps), written by thread 0.
// Contains barriers: call it from every thread of the block.
template <typename T>
__device__ __forceinline__ void shrink_row(const T* __restrict__ x, const float* __restrict__ ar,
                                           float* __restrict__ t, uint32_t row, uint32_t j,
                                           uint32_t in, uint32_t t_stride) {
  __shared__ float partial[WARPS];
  const T* xr = x + (size_t)row * in;
  float acc = 0.f;
  if (rows_by_four(xr, ar, in)) {
#pragma unroll 4
    for (uint32_t k = 4 * threadIdx.x; k < in; k += 4 * blockDim.x)
      acc += dot4(load4(xr + k), load4(ar + k));
  } else {
    for (uint32_t k = threadIdx.x; k < in; k += blockDim.x) acc += to_f32(xr[k]) * ar[k];
  }
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (uint32_t w = 0; w < WARPS; ++w) sum += partial[w];
    t[(size_t)row * t_stride + j] = sum;
  }
  __syncthreads();  // partial is reused by the block's next row
}

// A thread's output column o for adapter i: its part's Bᵀ column (`b`, `width` apart), the
// part's rank (0: no factors) and offset in t's row, and the first FUSED_PREFETCH factor values
// (loaded once, for every row the thread adds to; the fused kernels load them before waiting).
struct ExpandCol {
  const float* b;
  uint32_t width, offset, rank;
  float pre[FUSED_PREFETCH];
};

__device__ __forceinline__ ExpandCol expand_col_begin(const float* const* b_t,
                                                      const uint32_t* ranks,
                                                      const uint32_t* col_ends, uint32_t i,
                                                      uint32_t parts, uint32_t o) {
  ExpandCol c;
  uint32_t start;
  const uint32_t p = column_part(col_ends, ranks, i, parts, o, &start, &c.width, &c.offset);
  c.rank = ranks[i * parts + p];
  c.b = c.rank == 0 ? nullptr : b_t[i * parts + p] + (o - start);
#pragma unroll
  for (uint32_t j = 0; j < FUSED_PREFETCH; ++j)
    if (j < c.rank) c.pre[j] = c.b[(size_t)j * c.width];
  return c;
}

// t's part of one row (trow) . the column's Bᵀ values, j in order.
__device__ __forceinline__ float expand_col_sum(const ExpandCol& c, const float* trow) {
  float acc = 0.f;
#pragma unroll
  for (uint32_t j = 0; j < FUSED_PREFETCH; ++j)
    if (j < c.rank) acc += trow[c.offset + j] * c.pre[j];
  for (uint32_t j = FUSED_PREFETCH; j < c.rank; ++j)
    acc += trow[c.offset + j] * c.b[(size_t)j * c.width];
  return acc;
}

// y[row, o] += t's row (trow) . the column's Bᵀ values, when its part has factors.
template <typename T>
__device__ __forceinline__ void expand_col(const ExpandCol& c, const float* trow,
                                           T* __restrict__ y, uint32_t row, uint32_t o,
                                           uint32_t y_stride) {
  if (c.rank == 0) return;
  T* yp = y + (size_t)row * y_stride + o;
  *yp = from_f32<T>(to_f32(*yp) + expand_col_sum(c, trow));
}

// BGMV shrink. grid = (rows, max total rank), block = 32 * WARPS.
template <typename T>
__device__ void bgmv_shrink(const T* x, const uint32_t* row_adapter, const float* const* a,
                            const uint32_t* ranks, uint32_t parts, float* t, uint32_t in,
                            uint32_t t_stride) {
  uint32_t row = blockIdx.x, j = blockIdx.y, e, jr;
  uint32_t i = row_adapter[row];
  if (i == NO_ADAPTER || !rank_entry(ranks, i, parts, j, &e, &jr)) return;  // uniform
  shrink_row(x, a[e] + (size_t)jr * in, t, row, j, in, t_stride);
}

// The rows of a segment that block z of an SGMV launch takes: SGMV_ROWS consecutive ones, so
// that long segments spread over many blocks while each block still reuses its factor rows.
__device__ __forceinline__ void sgmv_rows(const uint32_t* s, uint32_t* r0, uint32_t* r1) {
  uint32_t start = s[0], len = s[1];
  uint32_t first = blockIdx.z * SGMV_ROWS;
  *r0 = start + min(first, len);
  *r1 = start + min(first + SGMV_ROWS, len);
}

// SGMV shrink. segments = [start, len, adapter] triples; grid = (segments, max total rank,
// ceil(longest segment / SGMV_ROWS)), block = 32 * WARPS.
template <typename T>
__device__ void sgmv_shrink(const T* x, const uint32_t* segments, const float* const* a,
                            const uint32_t* ranks, uint32_t parts, float* t, uint32_t in,
                            uint32_t t_stride) {
  const uint32_t* s = segments + 3 * blockIdx.x;
  uint32_t i = s[2], r0, r1, e, jr;
  sgmv_rows(s, &r0, &r1);
  uint32_t j = blockIdx.y;
  if (!rank_entry(ranks, i, parts, j, &e, &jr)) return;  // uniform over the block
  for (uint32_t row = r0; row < r1; ++row)
    shrink_row(x, a[e] + (size_t)jr * in, t, row, j, in, t_stride);
}

// Stages t's row (`rank` values) in shared memory. Contains a barrier.
__device__ __forceinline__ void stage_row(const float* t, float* trow, uint32_t row,
                                          uint32_t rank, uint32_t t_stride) {
  for (uint32_t j = threadIdx.x; j < rank; j += blockDim.x) trow[j] = t[(size_t)row * t_stride + j];
  __syncthreads();
}

// BGMV expand. grid = (rows, ceil(out / EXPAND_THREADS)), block = EXPAND_THREADS.
template <typename T>
__device__ void bgmv_expand(const float* t, const uint32_t* row_adapter, const float* const* b_t,
                            const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends,
                            T* y, uint32_t out, uint32_t t_stride, uint32_t y_stride) {
  __shared__ float trow[MAX_PARTS * MAX_RANK];
  uint32_t row = blockIdx.x;
  uint32_t i = row_adapter[row];
  if (i == NO_ADAPTER) return;
  stage_row(t, trow, row, total_rank(ranks, i, parts), t_stride);
  uint32_t o = blockIdx.y * blockDim.x + threadIdx.x;
  if (o < out) expand_col(expand_col_begin(b_t, ranks, col_ends, i, parts, o), trow, y, row, o,
                          y_stride);
}

// SGMV expand. grid = (segments, ceil(out / EXPAND_THREADS), ceil(longest segment /
// SGMV_ROWS)), block = EXPAND_THREADS.
template <typename T>
__device__ void sgmv_expand(const float* t, const uint32_t* segments, const float* const* b_t,
                            const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends,
                            T* y, uint32_t out, uint32_t t_stride, uint32_t y_stride) {
  __shared__ float trow[MAX_PARTS * MAX_RANK];
  const uint32_t* s = segments + 3 * blockIdx.x;
  uint32_t i = s[2], r0, r1;
  sgmv_rows(s, &r0, &r1);
  const uint32_t rank = total_rank(ranks, i, parts);
  uint32_t o = blockIdx.y * blockDim.x + threadIdx.x;
  ExpandCol c = {};
  if (o < out) c = expand_col_begin(b_t, ranks, col_ends, i, parts, o);
  for (uint32_t row = r0; row < r1; ++row) {
    __syncthreads();  // the previous row's trow is no longer read
    stage_row(t, trow, row, rank, t_stride);
    if (o < out) expand_col(c, trow, y, row, o, y_stride);
  }
}

// ---- Grouped BGMV (decode rows grouped by adapter inside the kernels) -----------------------
// The per-row kernels above read an adapter's factors once per row that uses it (the repeats
// come from L2). These take one adapter per block instead: the block finds the adapter's rows
// (in any order) with shared-memory atomics and accumulates GROUP_ROWS of them per factor
// value read, so each factor value is read once per block.
//
// Shrink: grid (adapters, ceil(max total rank / WARPS), splits), block 32 * WARPS, dynamic
//   shared memory rows * 4 bytes. Warp w takes j = blockIdx.y * WARPS + w (of the adapter's
//   concatenated ranks) and the slice [z * split_len, (z + 1) * split_len) of `in`
//   (z = blockIdx.z), and writes the partial dot product of each of its rows to t[z][row][j]
//   (t: [splits][rows][t_stride]); every split writes every (row, j < total rank) of its
//   adapter's rows, an empty slice a zero.
// Expand: grid (adapters, ceil(out / EXPAND_THREADS)), block EXPAND_THREADS, dynamic shared
//   memory rows * 4 bytes: sums the splits of GROUP_ROWS rows' t into shared memory, then adds
//   each of those rows' product for the thread's column o (as expand_col).

#define GROUP_ROWS 8

// The rows of `rows` whose adapter is `i`, into `list` (shared, any order); their number, in
// every thread. Contains a barrier: call it from every thread of the block.
__device__ __forceinline__ uint32_t rows_of_adapter(const uint32_t* __restrict__ row_adapter,
                                                    uint32_t rows, uint32_t i, uint32_t* list) {
  __shared__ uint32_t count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x)
    if (row_adapter[r] == i) list[atomicAdd(&count, 1u)] = r;
  __syncthreads();
  return count;
}

// The grouped shrink's work for adapter i, rank block jy (WARPS values of j) and split z.
// Contains a barrier first, none after it: call it from every thread of the block.
template <typename T>
__device__ void grouped_shrink_item(const T* __restrict__ x, const uint32_t* row_adapter,
                                    const float* const* a, const uint32_t* ranks, uint32_t parts,
                                    float* __restrict__ t, uint32_t in, uint32_t t_stride,
                                    uint32_t rows, uint32_t split_len, uint32_t i, uint32_t jy,
                                    uint32_t z) {
  extern __shared__ uint32_t list[];
  uint32_t e, jr;
  uint32_t n = rows_of_adapter(row_adapter, rows, i, list);
  uint32_t j = jy * WARPS + threadIdx.x / 32;
  // Uniform over the warp: no barrier follows.
  if (n == 0 || !rank_entry(ranks, i, parts, j, &e, &jr)) return;
  uint32_t lane = threadIdx.x % 32;
  uint32_t k0 = min(z * split_len, in);
  uint32_t k1 = min(k0 + split_len, in);
  const float* ar = a[e] + (size_t)jr * in;
  float* tz = t + (size_t)z * rows * t_stride;
  for (uint32_t g0 = 0; g0 < n; g0 += GROUP_ROWS) {
    uint32_t gn = min(n - g0, (uint32_t)GROUP_ROWS);
    const T* xr[GROUP_ROWS];
    float acc[GROUP_ROWS];
#pragma unroll
    for (uint32_t g = 0; g < GROUP_ROWS; ++g) {
      xr[g] = x + (size_t)list[g0 + min(g, gn - 1)] * in;
      acc[g] = 0.f;
    }
    // Four values a lane at a time when every row allows it (split_len is a multiple of 32).
    bool by_four = rows_by_four(xr[0], ar, in);
#pragma unroll
    for (uint32_t g = 1; g < GROUP_ROWS; ++g) by_four = by_four && aligned_to(xr[g], 4 * sizeof(T));
    if (by_four) {
      for (uint32_t k = k0 + 4 * lane; k < k1; k += 128) {
        const Vec4<float> av = load4(ar + k);
#pragma unroll
        for (uint32_t g = 0; g < GROUP_ROWS; ++g)
          if (g < gn) acc[g] += dot4(load4(xr[g] + k), av);
      }
    } else {
      for (uint32_t k = k0 + lane; k < k1; k += 32) {
        float av = ar[k];
#pragma unroll
        for (uint32_t g = 0; g < GROUP_ROWS; ++g)
          if (g < gn) acc[g] += to_f32(xr[g][k]) * av;
      }
    }
#pragma unroll
    for (uint32_t g = 0; g < GROUP_ROWS; ++g) {
      float sum = warp_sum(acc[g]);
      if (lane == 0 && g < gn) tz[(size_t)list[g0 + g] * t_stride + j] = sum;
    }
  }
}

// The grouped expand's work for adapter i and column block ob. With `ready` (a fused launch),
// first waits until *ready reaches ready_target (the adapter's shrink items are done); the
// thread's first FUSED_PREFETCH factor values are loaded before that, and serve every group of
// rows. t is read through L2 (__ldcg: in a fused launch other blocks wrote it). Contains
// barriers: call it from every thread of the block.
template <typename T>
__device__ void grouped_expand_item(const float* t, const uint32_t* row_adapter,
                                    const float* const* b_t, const uint32_t* ranks,
                                    uint32_t parts, const uint32_t* col_ends,
                                    T* __restrict__ y, uint32_t out, uint32_t t_stride,
                                    uint32_t y_stride, uint32_t rows, uint32_t splits,
                                    uint32_t i, uint32_t ob, const uint32_t* ready,
                                    uint32_t ready_target) {
  extern __shared__ uint32_t list[];
  __shared__ float trows[GROUP_ROWS][MAX_PARTS * MAX_RANK];
  uint32_t n = rows_of_adapter(row_adapter, rows, i, list);
  if (n == 0) return;  // uniform over the block
  const uint32_t rank = total_rank(ranks, i, parts);
  const uint32_t o = ob * blockDim.x + threadIdx.x;
  ExpandCol c = {};  // rank 0 past the last column
  if (o < out) c = expand_col_begin(b_t, ranks, col_ends, i, parts, o);
  if (ready != nullptr) {
    if (threadIdx.x == 0) wait_count(ready, ready_target);
    __syncthreads();
  }
  for (uint32_t g0 = 0; g0 < n; g0 += GROUP_ROWS) {
    uint32_t gn = min(n - g0, (uint32_t)GROUP_ROWS);
    __syncthreads();  // the previous group's trows are no longer read
    for (uint32_t el = threadIdx.x; el < gn * rank; el += blockDim.x) {
      uint32_t g = el / rank, j = el % rank;
      const float* tp = t + (size_t)list[g0 + g] * t_stride + j;
      float sum = 0.f;
      for (uint32_t z = 0; z < splits; ++z) sum += __ldcg(tp + (size_t)z * rows * t_stride);
      trows[g][j] = sum;
    }
    __syncthreads();
    if (c.rank == 0) continue;
    float acc[GROUP_ROWS];
#pragma unroll
    for (uint32_t g = 0; g < GROUP_ROWS; ++g) acc[g] = 0.f;
#pragma unroll
    for (uint32_t j = 0; j < FUSED_PREFETCH; ++j) {
      if (j < c.rank) {
#pragma unroll
        for (uint32_t g = 0; g < GROUP_ROWS; ++g)
          if (g < gn) acc[g] += trows[g][c.offset + j] * c.pre[j];
      }
    }
    for (uint32_t j = FUSED_PREFETCH; j < c.rank; ++j) {
      float bv = c.b[(size_t)j * c.width];
#pragma unroll
      for (uint32_t g = 0; g < GROUP_ROWS; ++g)
        if (g < gn) acc[g] += trows[g][c.offset + j] * bv;
    }
#pragma unroll
    for (uint32_t g = 0; g < GROUP_ROWS; ++g) {
      if (g < gn) {
        T* yp = y + (size_t)list[g0 + g] * y_stride + o;
        *yp = from_f32<T>(to_f32(*yp) + acc[g]);
      }
    }
  }
}

// ---- Fused BGMV (shrink and expand in one launch) --------------------------------------------
// A decode step's LoRA is latency-bound: two dependent launches cost two launch gaps and two
// ramp-ups and drains, about what moving the few MB of factors takes. These run both halves in
// one launch whose blocks take tickets in the order they start (an atomic counter): the first
// rows * max_rank tickets are the per-row shrink's (row, j) dot products, the rest the per-row
// expand's (row, column block) items. An expand item loads its y values and first factor values,
// then waits until its row's shrink items are all done (a per-row counter); since every item it
// waits on holds an earlier ticket, that item's block is already running and the wait ends
// (no deadlock, whatever the order blocks start in or how many fit on the GPU at once).
//
// grid (rows * max_rank + rows * ceil(out / EXPAND_THREADS)), block EXPAND_THREADS (= 32 *
// WARPS). sync: FUSED_SYNC_WORDS + rows u32 counters (the ticket, the blocks finished, then one
// per row), zero before the launch; the last block to finish sets them back to zero for the
// next launch on the stream. t: [rows, t_stride] as for the per-row kernels.

template <typename T>
__device__ void bgmv_fused(const T* __restrict__ x, const uint32_t* row_adapter,
                           const float* const* a, const float* const* b_t, const uint32_t* ranks,
                           uint32_t parts, const uint32_t* col_ends, float* t, T* y, uint32_t in,
                           uint32_t out, uint32_t t_stride, uint32_t y_stride, uint32_t rows,
                           uint32_t max_rank, uint32_t* sync) {
  __shared__ float trow[MAX_PARTS * MAX_RANK];
  const uint32_t ticket = take_ticket(sync);
  uint32_t* row_done = sync + FUSED_SYNC_WORDS;
  const uint32_t shrinks = rows * max_rank;
  if (ticket < shrinks) {
    const uint32_t row = ticket / max_rank, j = ticket % max_rank;
    const uint32_t i = row_adapter[row];
    uint32_t e, jr;
    if (i != NO_ADAPTER && rank_entry(ranks, i, parts, j, &e, &jr))  // uniform over the block
      shrink_row(x, a[e] + (size_t)jr * in, t, row, j, in, t_stride);
    // Every shrink item counts, idle or not: a row is done at max_rank.
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(&row_done[row], 1u);
    }
  } else {
    const uint32_t k = ticket - shrinks, col_blocks = (out + blockDim.x - 1) / blockDim.x;
    const uint32_t row = k / col_blocks, o = (k % col_blocks) * blockDim.x + threadIdx.x;
    const uint32_t i = row < rows ? row_adapter[row] : NO_ADAPTER;
    if (i != NO_ADAPTER) {  // uniform over the block
      // Before the wait: the thread's column, its first factor values and y's value.
      ExpandCol c = {};  // rank 0 past the last column
      float yv = 0.f;
      if (o < out) {
        c = expand_col_begin(b_t, ranks, col_ends, i, parts, o);
        if (c.rank != 0) yv = to_f32(y[(size_t)row * y_stride + o]);
      }
      if (threadIdx.x == 0) wait_count(&row_done[row], max_rank);
      __syncthreads();
      const uint32_t rank = total_rank(ranks, i, parts);
      // L2 reads (__ldcg): t was written by other blocks during this launch.
      for (uint32_t j = threadIdx.x; j < rank; j += blockDim.x)
        trow[j] = __ldcg(t + (size_t)row * t_stride + j);
      __syncthreads();
      if (c.rank != 0) y[(size_t)row * y_stride + o] = from_f32<T>(yv + expand_col_sum(c, trow));
    }
  }
  finish_fused(sync, FUSED_SYNC_WORDS + rows);
}

// ---- Fused grouped BGMV ---------------------------------------------------------------------
// The grouped kernels' items in one launch, ticketed as in bgmv_fused: first the shrink items
// (adapter i, rank block jy of WARPS values, split z of `in`), then the expand items (adapter i,
// column block ob). An expand item finds its adapter's rows and loads its first factor values,
// then waits until the adapter's counter has all of its shrink items.
//
// grid (adapters * ceil(max_rank / WARPS) * splits + adapters * ceil(out / EXPAND_THREADS)),
// block 32 * WARPS (= EXPAND_THREADS), dynamic shared memory rows * 4 bytes. t: [splits][rows]
// [t_stride] as for the grouped kernels. sync: FUSED_SYNC_WORDS + adapters u32 counters, zero
// before the launch, zero again after it.
template <typename T>
__device__ void bgmv_fused_grouped(const T* x, const uint32_t* row_adapter, const float* const* a,
                                   const float* const* b_t, const uint32_t* ranks, uint32_t parts,
                                   const uint32_t* col_ends, float* t, T* y, uint32_t in,
                                   uint32_t out, uint32_t t_stride, uint32_t y_stride,
                                   uint32_t rows, uint32_t adapters, uint32_t max_rank,
                                   uint32_t splits, uint32_t split_len, uint32_t* sync) {
  const uint32_t ticket = take_ticket(sync);
  uint32_t* adapter_done = sync + FUSED_SYNC_WORDS;
  const uint32_t per_adapter = (max_rank + WARPS - 1) / WARPS * splits;
  const uint32_t shrinks = adapters * per_adapter;
  if (ticket < shrinks) {
    const uint32_t i = ticket / per_adapter, item = ticket % per_adapter;
    grouped_shrink_item<T>(x, row_adapter, a, ranks, parts, t, in, t_stride, rows, split_len, i,
                           item / splits, item % splits);
    // Each warp's lane 0 wrote its rows' values: every writer fences before the item counts.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&adapter_done[i], 1u);
  } else {
    const uint32_t k = ticket - shrinks, col_blocks = (out + blockDim.x - 1) / blockDim.x;
    const uint32_t i = k / col_blocks;
    if (i < adapters)
      grouped_expand_item<T>(t, row_adapter, b_t, ranks, parts, col_ends, y, out, t_stride,
                             y_stride, rows, splits, i, k % col_blocks, &adapter_done[i],
                             per_adapter);
  }
  finish_fused(sync, FUSED_SYNC_WORDS + adapters);
}

#define LORA_ENTRY_POINTS(SUFFIX, T)                                                            \
  extern "C" __global__ void medley_bgmv_shrink_##SUFFIX(                                       \
      const T* x, const uint32_t* row_adapter, const float* const* a, const uint32_t* ranks,    \
      uint32_t parts, float* t, uint32_t in, uint32_t t_stride) {                               \
    bgmv_shrink<T>(x, row_adapter, a, ranks, parts, t, in, t_stride);                           \
  }                                                                                             \
  extern "C" __global__ void medley_sgmv_shrink_##SUFFIX(                                       \
      const T* x, const uint32_t* segments, const float* const* a, const uint32_t* ranks,       \
      uint32_t parts, float* t, uint32_t in, uint32_t t_stride) {                               \
    sgmv_shrink<T>(x, segments, a, ranks, parts, t, in, t_stride);                              \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_expand_##SUFFIX(                                       \
      const float* t, const uint32_t* row_adapter, const float* const* b_t,                     \
      const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends, T* y, uint32_t out,      \
      uint32_t t_stride, uint32_t y_stride) {                                                   \
    bgmv_expand<T>(t, row_adapter, b_t, ranks, parts, col_ends, y, out, t_stride, y_stride);    \
  }                                                                                             \
  extern "C" __global__ void medley_sgmv_expand_##SUFFIX(                                       \
      const float* t, const uint32_t* segments, const float* const* b_t, const uint32_t* ranks, \
      uint32_t parts, const uint32_t* col_ends, T* y, uint32_t out, uint32_t t_stride,          \
      uint32_t y_stride) {                                                                      \
    sgmv_expand<T>(t, segments, b_t, ranks, parts, col_ends, y, out, t_stride, y_stride);       \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_shrink_grouped_##SUFFIX(                               \
      const T* x, const uint32_t* row_adapter, const float* const* a, const uint32_t* ranks,    \
      uint32_t parts, float* t, uint32_t in, uint32_t t_stride, uint32_t rows,                  \
      uint32_t split_len) {                                                                     \
    grouped_shrink_item<T>(x, row_adapter, a, ranks, parts, t, in, t_stride, rows, split_len,   \
                           blockIdx.x, blockIdx.y, blockIdx.z);                                 \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_expand_grouped_##SUFFIX(                               \
      const float* t, const uint32_t* row_adapter, const float* const* b_t,                     \
      const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends, T* y, uint32_t out,      \
      uint32_t t_stride, uint32_t y_stride, uint32_t rows, uint32_t splits) {                   \
    grouped_expand_item<T>(t, row_adapter, b_t, ranks, parts, col_ends, y, out, t_stride,       \
                           y_stride, rows, splits, blockIdx.x, blockIdx.y, nullptr, 0);         \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_fused_##SUFFIX(                                        \
      const T* x, const uint32_t* row_adapter, const float* const* a, const float* const* b_t,  \
      const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends, float* t, T* y,          \
      uint32_t in, uint32_t out, uint32_t t_stride, uint32_t y_stride, uint32_t rows,           \
      uint32_t max_rank, uint32_t* sync) {                                                      \
    bgmv_fused<T>(x, row_adapter, a, b_t, ranks, parts, col_ends, t, y, in, out, t_stride,      \
                  y_stride, rows, max_rank, sync);                                              \
  }                                                                                             \
  extern "C" __global__ void medley_bgmv_fused_grouped_##SUFFIX(                                \
      const T* x, const uint32_t* row_adapter, const float* const* a, const float* const* b_t,  \
      const uint32_t* ranks, uint32_t parts, const uint32_t* col_ends, float* t, T* y,          \
      uint32_t in, uint32_t out, uint32_t t_stride, uint32_t y_stride, uint32_t rows,           \
      uint32_t adapters, uint32_t max_rank, uint32_t splits, uint32_t split_len,                \
      uint32_t* sync) {                                                                         \
    bgmv_fused_grouped<T>(x, row_adapter, a, b_t, ranks, parts, col_ends, t, y, in, out,        \
                          t_stride, y_stride, rows, adapters, max_rank, splits, split_len,      \
                          sync);                                                                \
  }

LORA_ENTRY_POINTS(f32, float)
LORA_ENTRY_POINTS(bf16, __nv_bfloat16)
LORA_ENTRY_POINTS(f16, __half)
