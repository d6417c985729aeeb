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
