// kernels/cuda/gather.cu under the emulator.
#include "registry.h"

#include "gather.emu.cu"

MEDLEY_EMU_REGISTRY(gather, MEDLEY_EMU_KERNEL(medley_gather_rows_b16),
                    MEDLEY_EMU_KERNEL(medley_gather_rows_b32))
