// kernels/cuda/fused.cu under the emulator.
#include "registry.h"

#include "fused.emu.cu"

MEDLEY_EMU_REGISTRY(fused, MEDLEY_EMU_KERNEL(medley_rms_norm_bf16),
                    MEDLEY_EMU_KERNEL(medley_silu_mul_bf16), MEDLEY_EMU_KERNEL(medley_rms_norm_f16),
                    MEDLEY_EMU_KERNEL(medley_silu_mul_f16))
