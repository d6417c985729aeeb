// kernels/cuda/sampling.cu under the emulator.
#include "registry.h"

#include "sampling.emu.cu"

MEDLEY_EMU_REGISTRY(sampling, MEDLEY_EMU_KERNEL(medley_greedy_f32))
