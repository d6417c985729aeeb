// The emulator's out-of-line pieces: the x86-64 stack switch (see cuda_emu.h) and the one
// launch entry over every emulated source's registry (registry.h).
#include "cuda_emu.h"

#define MEDLEY_EMU_SOURCE_ENTRY(FILE)                                                    \
  extern "C" int medley_emu_launch_##FILE(const char* name, const uint32_t* grid,       \
                                          const uint32_t* block, size_t shared,         \
                                          void** params);
MEDLEY_EMU_SOURCE_ENTRY(lora)
MEDLEY_EMU_SOURCE_ENTRY(fused)
MEDLEY_EMU_SOURCE_ENTRY(attention)
MEDLEY_EMU_SOURCE_ENTRY(sampling)
MEDLEY_EMU_SOURCE_ENTRY(gather)

// Launches kernel `name` from whichever source has it; 1 when none does.
extern "C" int medley_emu_launch(const char* name, const uint32_t* grid, const uint32_t* block,
                                 size_t shared, void** params) {
  for (auto entry : {medley_emu_launch_lora, medley_emu_launch_fused, medley_emu_launch_attention,
                     medley_emu_launch_sampling, medley_emu_launch_gather})
    if (entry(name, grid, block, shared, params) == 0) return 0;
  return 1;
}

#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.globl medley_emu_switch
.hidden medley_emu_switch
.type medley_emu_switch, @function
medley_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size medley_emu_switch, .-medley_emu_switch
)");
#endif
