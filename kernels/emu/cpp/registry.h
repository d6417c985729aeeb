// The emulated kernels' launch entry, shared by every translation unit of one .cu file: kernels
// are registered by name and launched from their parameters as cuLaunchKernel takes them (an
// array of pointers, one to each parameter's value).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_emu.h"

namespace emu {

using Launcher = std::function<void(dim3, dim3, size_t, void**)>;

template <typename... P, size_t... I>
void call(void (*k)(P...), dim3 grid, dim3 block, size_t shared, void** params,
          std::index_sequence<I...>) {
  launch(k, grid, block, shared, *static_cast<std::decay_t<P>*>(params[I])...);
}

template <typename... P>
Launcher entry(void (*k)(P...)) {
  return [k](dim3 grid, dim3 block, size_t shared, void** params) {
    call(k, grid, block, shared, params, std::index_sequence_for<P...>{});
  };
}

}  // namespace emu

// Defines `extern "C" int medley_emu_launch_<file>(name, grid, block, shared, params)` over the
// kernels listed: launches kernel `name` over grid[3] blocks of block[3] threads with `shared`
// bytes of dynamic shared memory, `params[i]` pointing to the i-th parameter's value. Returns
// 0, or 1 when no kernel of this file has that name.
#define MEDLEY_EMU_REGISTRY(FILE, ...)                                                          \
  extern "C" int medley_emu_launch_##FILE(const char* name, const uint32_t* grid,              \
                                          const uint32_t* block, size_t shared, void** params) { \
    static const std::map<std::string, emu::Launcher> kernels = {__VA_ARGS__};                 \
    auto k = kernels.find(name);                                                               \
    if (k == kernels.end()) return 1;                                                          \
    k->second(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared,     \
              params);                                                                         \
    return 0;                                                                                  \
  }

// A registry entry: the kernel under its own name.
#define MEDLEY_EMU_KERNEL(K) {#K, emu::entry(K)}
