// kernels/cuda/fused.cu under the emulator.
#include "registry.h"

#include "fused.emu.cu"

#define FUSED_KERNELS(S)                                                       \
  MEDLEY_EMU_KERNEL(medley_rms_norm_##S), MEDLEY_EMU_KERNEL(medley_silu_mul_##S), \
      MEDLEY_EMU_KERNEL(medley_add_rms_norm_##S)

MEDLEY_EMU_REGISTRY(fused, FUSED_KERNELS(bf16), FUSED_KERNELS(f16))
