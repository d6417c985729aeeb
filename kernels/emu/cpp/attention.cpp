// kernels/cuda/attention.cu under the emulator.
#include "registry.h"

#include "attention.emu.cu"

#define ATTENTION_KERNELS(S)                                                            \
  MEDLEY_EMU_KERNEL(medley_kv_write_##S), MEDLEY_EMU_KERNEL(medley_paged_attention_##S), \
      MEDLEY_EMU_KERNEL(medley_rope_kv_write_##S)

MEDLEY_EMU_REGISTRY(attention, ATTENTION_KERNELS(f32), ATTENTION_KERNELS(bf16),
                    ATTENTION_KERNELS(f16))
