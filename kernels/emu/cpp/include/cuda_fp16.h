// The emulator's f16 (see ../cuda_emu.h): GCC's _Float16, whose conversions round to nearest
// even like the GPU's __float2half.
#pragma once

struct __half {
  _Float16 v;
};

inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half(float f) { return {_Float16(f)}; }
