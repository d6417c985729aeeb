// The emulator's one out-of-line piece: the x86-64 stack switch (see cuda_emu.h).
#include "cuda_emu.h"

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
