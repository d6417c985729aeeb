// kernels/cuda/lora.cu under the emulator (build.rs rewrites its dynamic shared memory into
// lora.emu.cu), registered for medley_emu_launch.
#include "registry.h"

#include "lora.emu.cu"

#define LORA_NAMES(S)                                                                        \
  {"medley_bgmv_shrink_" #S, emu::entry(medley_bgmv_shrink_##S)},                             \
      {"medley_sgmv_shrink_" #S, emu::entry(medley_sgmv_shrink_##S)},                         \
      {"medley_bgmv_expand_" #S, emu::entry(medley_bgmv_expand_##S)},                         \
      {"medley_sgmv_expand_" #S, emu::entry(medley_sgmv_expand_##S)},                         \
      {"medley_bgmv_shrink_grouped_" #S, emu::entry(medley_bgmv_shrink_grouped_##S)},         \
      {"medley_bgmv_expand_grouped_" #S, emu::entry(medley_bgmv_expand_grouped_##S)}

// Launches kernel `name` over grid[3] blocks of block[3] threads with `shared` bytes of dynamic
// shared memory; `params[i]` points to the i-th parameter's value. Returns 0, or 1 when no
// kernel has that name.
extern "C" int medley_emu_launch_lora(const char* name, const uint32_t* grid,
                                      const uint32_t* block, size_t shared, void** params) {
  static const std::map<std::string, emu::Launcher> kernels = {LORA_NAMES(f32), LORA_NAMES(bf16),
                                                               LORA_NAMES(f16)};
  auto k = kernels.find(name);
  if (k == kernels.end()) return 1;
  k->second(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared, params);
  return 0;
}
