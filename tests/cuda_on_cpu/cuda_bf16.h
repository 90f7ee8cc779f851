// bfloat16 for the CPU runtime (cuda_runtime.h here): the storage type and the conversions
// the kernels use, rounding to nearest even as CUDA's do; no arithmetic or implicit
// conversions (see cuda_fp16.h).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // ties to even
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float value;
  std::memcpy(&value, &u, sizeof value);
  return value;
}
