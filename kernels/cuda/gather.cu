// Row gathers of a step's inputs on the device: the embedding rows of the step's token ids and
// the rotary tables' rows of its positions, read from ids already on the device. They replace
// candle's `index_select`, which uploads its index's shape with every call, so that a decode
// step recorded into a CUDA graph (shard/src/model/graphs.rs) uploads nothing while it runs.
//
// gather_rows: grid (rows, ceil(width / 256)), block 256.
//   out[r, c] = table[idx[r], c] for c < width, values of 2 (b16) or 4 (b32) bytes copied bit
//   for bit (the dtype does not matter); an index at or past `table_rows` writes zeros (a graph
//   replays whatever ids the host wrote: it never reads out of bounds).

#include <stdint.h>

#define GATHER_THREADS 256

template <typename W>
__device__ void gather_rows(const W* __restrict__ table, const uint32_t* __restrict__ idx,
                            W* __restrict__ out, uint32_t width, uint32_t table_rows) {
  const uint32_t r = blockIdx.x;
  const uint32_t c = blockIdx.y * GATHER_THREADS + threadIdx.x;
  if (c >= width) return;
  const uint32_t i = idx[r];
  out[(size_t)r * width + c] = i < table_rows ? table[(size_t)i * width + c] : (W)0;
}

extern "C" __global__ void medley_gather_rows_b16(const uint16_t* table, const uint32_t* idx,
                                                  uint16_t* out, uint32_t width,
                                                  uint32_t table_rows) {
  gather_rows(table, idx, out, width, table_rows);
}

extern "C" __global__ void medley_gather_rows_b32(const uint32_t* table, const uint32_t* idx,
                                                  uint32_t* out, uint32_t width,
                                                  uint32_t table_rows) {
  gather_rows(table, idx, out, width, table_rows);
}
