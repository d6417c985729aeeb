// A CUDA emulator for the CPU, enough to run Medley's kernels (kernels/cuda/*.cu) as plain C++
// in tests. A launch runs its blocks one after another; a block's threads are fibers on the
// calling thread, switched at barriers (a stack switch of a few instructions on x86-64, ucontext
// elsewhere), so a block of 256 threads costs no OS threads.
//
// * threadIdx / blockIdx / blockDim / gridDim: the running fiber's and block's.
// * __syncthreads(): a barrier of the block's live threads; a thread that returns from the
//   kernel leaves it (and its warp's), as an exited GPU thread no longer takes part. Threads
//   waiting at a barrier that the others can never reach abort the launch ("deadlock"), which a
//   GPU would hang on or leave undefined.
// * __shfl_down_sync / __shfl_xor_sync: lanes exchange values through the warp's buffer between
//   two barriers of the warp (the kernels shuffle with every lane of a warp present).
// * __shared__ variables become function statics: one copy, owned by the block running at the
//   time (blocks run in turn, and launches one at a time; a kernel sets its shared memory before
//   reading it, as on a GPU). The build rewrites `extern __shared__ T name[];` into
//   `T* name = emu::dynamic_shared<T>();`, the launch's dynamic shared memory, which starts as
//   garbage bytes.
// * atomicAdd: the fibers of a block never run at once, so a plain read-add-write.
// * __threadfence / __ldcg: plain (blocks run in turn: an earlier block's writes are visible to
//   later ones). A bounded wait for another block (clock64 and __trap) aborts the launch after
//   a few turns: that block has either run already or never will.
// * bf16 and f16: include/cuda_bf16.h and include/cuda_fp16.h, rounding to nearest even like
//   the GPU's conversions.
//
// What it does not model: speed, memory coalescing, races between blocks, or lanes of a warp
// diverging around a shuffle. It checks the kernels' indexing and arithmetic.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  uint32_t x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(uint32_t x_, uint32_t y_ = 1, uint32_t z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

constexpr uint32_t WARP = 32;
constexpr size_t STACK_BYTES = 128 * 1024;

#if defined(__x86_64__)
// medley_emu_switch(save, next): saves the callee-saved registers on the current stack, stores
// its pointer in *save, and resumes the stack `next` (which a previous switch saved, or
// start_stack prepared). Defined once, in emu.cpp.
extern "C" void medley_emu_switch(void** save, void* next);


// A fresh stack whose first switch enters `entry` (which must never return).
inline void* start_stack(char* base, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uintptr_t*>(top);
  *--slot = 0;                                      // entry's return address (unused)
  *--slot = reinterpret_cast<uintptr_t>(entry);     // where the switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--slot = 0;          // rbp rbx r12 r13 r14 r15
  return slot;
}
#endif

// A barrier among the fibers of a block: `expected` live participants.
struct Barrier {
  uint32_t expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  dim3 thread;
  uint32_t linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;  // blocked until its generation moves past wait_generation
  uint64_t wait_generation = 0;
};

// The running block.
struct Block {
  dim3 index, dim, grid;
  std::vector<unsigned char> dynamic;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> exchange;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  std::function<void()> body;
};

inline Block*& running() {
  static Block* block = nullptr;
  return block;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(running()->dynamic.data());
}

// The running fiber gives the CPU back to the scheduler.
inline void yield_to_scheduler() {
  Block* blk = running();
#if defined(__x86_64__)
  medley_emu_switch(&blk->current->sp, blk->scheduler_sp);
#else
  swapcontext(&blk->current->context, &blk->scheduler);
#endif
}

// The scheduler runs fiber `f` until it yields or ends.
inline void resume(Block& blk, Fiber& f) {
  blk.current = &f;
#if defined(__x86_64__)
  medley_emu_switch(&blk.scheduler_sp, f.sp);
#else
  swapcontext(&blk.scheduler, &f.context);
#endif
}

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
}

// The running fiber arrives at `b`; it waits (yields to the scheduler) unless it is the last.
inline void arrive(Barrier& b) {
  Block* blk = running();
  if (++b.arrived == b.expected) {
    release(b);
    return;
  }
  Fiber* f = blk->current;
  f->waiting = &b;
  f->wait_generation = b.generation;
  yield_to_scheduler();
}

// An exited fiber no longer takes part in `b`.
inline void leave(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) release(b);
}

inline void fiber_main() {
  Block* blk = running();
  Fiber* f = blk->current;
  blk->body();
  f->done = true;
  leave(blk->all);
  leave(blk->warps[f->linear / WARP]);
#if defined(__x86_64__)
  yield_to_scheduler();  // never resumed: the fiber is done
  std::abort();
#endif
  // With ucontext, returning resumes the scheduler (uc_link).
}

inline float shuffle(float v, uint32_t src_lane) {
  Block* blk = running();
  uint32_t warp = blk->current->linear / WARP, lane = blk->current->linear % WARP;
  float* slots = blk->exchange.data() + warp * WARP;
  slots[lane] = v;
  arrive(blk->warps[warp]);
  float got = src_lane < WARP ? slots[src_lane] : v;
  arrive(blk->warps[warp]);
  return got;
}

// One launch at a time: shared variables and the running block are process-wide.
inline std::mutex& launch_lock() {
  static std::mutex m;
  return m;
}

#if !defined(__x86_64__)
// A context to start fibers from (getcontext once: it is a system call).
inline const ucontext_t& context_template() {
  static ucontext_t c = [] {
    ucontext_t t;
    getcontext(&t);
    return t;
  }();
  return c;
}
#endif

// Stacks of the fibers, kept for the next block.
inline std::vector<std::unique_ptr<char[]>>& stacks() {
  static std::vector<std::unique_ptr<char[]>> s;
  return s;
}

inline void run_block(Block& blk, uint32_t n) {
  while (stacks().size() < n) stacks().emplace_back(new char[STACK_BYTES]);
  blk.all = Barrier{n};
  blk.warps.clear();
  for (uint32_t w = 0; w * WARP < n; ++w) blk.warps.push_back(Barrier{std::min(WARP, n - w * WARP)});
  blk.exchange.assign(n, 0.f);
  blk.fibers.assign(n, Fiber{});
  for (uint32_t t = 0; t < n; ++t) {
    Fiber& f = blk.fibers[t];
    f.linear = t;
    f.thread = dim3(t % blk.dim.x, (t / blk.dim.x) % blk.dim.y, t / (blk.dim.x * blk.dim.y));
#if defined(__x86_64__)
    f.sp = start_stack(stacks()[t].get(), STACK_BYTES, fiber_main);
#else
    f.context = context_template();
    f.context.uc_stack.ss_sp = stacks()[t].get();
    f.context.uc_stack.ss_size = STACK_BYTES;
    f.context.uc_link = &blk.scheduler;
    makecontext(&f.context, fiber_main, 0);
#endif
  }
  for (;;) {
    bool all_done = true, progressed = false;
    for (Fiber& f : blk.fibers) {
      if (f.done) continue;
      all_done = false;
      if (f.waiting && f.waiting->generation == f.wait_generation) continue;
      f.waiting = nullptr;
      resume(blk, f);
      progressed = true;
    }
    if (all_done) return;
    if (!progressed) {
      std::fprintf(stderr,
                   "cuda emulator: deadlock in block (%u, %u, %u): threads wait at a barrier the "
                   "others never reach\n",
                   blk.index.x, blk.index.y, blk.index.z);
      std::abort();
    }
  }
}

// Runs `kernel(args...)` over `grid` blocks of `block` threads with `shared` bytes of dynamic
// shared memory, after any other launch in the process has finished.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, Args... args) {
  std::lock_guard<std::mutex> lock(launch_lock());
  uint32_t n = block.x * block.y * block.z;
  Block blk;
  blk.dim = block;
  blk.grid = grid;
  blk.body = [&] { kernel(args...); };
  running() = &blk;
  for (uint32_t bz = 0; bz < grid.z; ++bz)
    for (uint32_t by = 0; by < grid.y; ++by)
      for (uint32_t bx = 0; bx < grid.x; ++bx) {
        blk.index = dim3(bx, by, bz);
        // Garbage, as a GPU's shared memory holds: a kernel must not read what it did not write.
        blk.dynamic.assign(shared, 0xa5);
        run_block(blk, n);
      }
  running() = nullptr;
}

}  // namespace emu

#define threadIdx (emu::running()->current->thread)
#define blockIdx (emu::running()->index)
#define blockDim (emu::running()->dim)
#define gridDim (emu::running()->grid)

inline void __syncthreads() { emu::arrive(emu::running()->all); }

inline float __shfl_down_sync(unsigned, float v, int delta) {
  return emu::shuffle(v, emu::running()->current->linear % emu::WARP + delta);
}

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return emu::shuffle(v, (emu::running()->current->linear % emu::WARP) ^ mask);
}

inline uint32_t atomicAdd(uint32_t* p, uint32_t v) {
  uint32_t old = *p;
  *p = old + v;
  return old;
}

// Memory order between blocks: blocks run one after another, so every earlier block's writes
// are already visible.
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }
inline void __nanosleep(unsigned) {}
// A clock that moves fast: a kernel's bounded wait (a spin on a counter that only another block
// can move, which here has either run already or never will) gives up after a few turns.
inline long long clock64() {
  static long long now = 0;
  return now += 1ll << 33;
}
inline void __trap() {
  std::fprintf(stderr, "cuda emulator: __trap() in block (%u, %u, %u)\n", emu::running()->index.x,
               emu::running()->index.y, emu::running()->index.z);
  std::abort();
}

inline uint32_t min(uint32_t a, uint32_t b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// Round-to-nearest f32 arithmetic that a compiler may not fuse (C++20 does not contract).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
