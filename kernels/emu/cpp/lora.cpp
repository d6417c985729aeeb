// kernels/cuda/lora.cu under the emulator (build.rs rewrites its dynamic shared memory into
// lora.emu.cu).
#include "registry.h"

#include "lora.emu.cu"

#define LORA_KERNELS(S)                                                                  \
  MEDLEY_EMU_KERNEL(medley_bgmv_shrink_##S), MEDLEY_EMU_KERNEL(medley_sgmv_shrink_##S),   \
      MEDLEY_EMU_KERNEL(medley_bgmv_expand_##S), MEDLEY_EMU_KERNEL(medley_sgmv_expand_##S), \
      MEDLEY_EMU_KERNEL(medley_bgmv_shrink_grouped_##S),                                  \
      MEDLEY_EMU_KERNEL(medley_bgmv_expand_grouped_##S), MEDLEY_EMU_KERNEL(medley_bgmv_fused_##S),  \
      MEDLEY_EMU_KERNEL(medley_bgmv_fused_grouped_##S)

MEDLEY_EMU_REGISTRY(lora, LORA_KERNELS(f32), LORA_KERNELS(bf16), LORA_KERNELS(f16))
