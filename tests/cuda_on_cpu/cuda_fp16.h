// float16 for the CPU runtime (cuda_runtime.h here): the storage type and the conversions
// the kernels use, each rounding to nearest even as CUDA's do. No arithmetic and no
// implicit conversions: torch's nvcc flags turn those off for the real build too
// (-D__CUDA_NO_HALF_OPERATORS__, -D__CUDA_NO_HALF_CONVERSIONS__), so a kernel must not need them.
#pragma once

#include <cmath>
#include <cstdint>

struct __half {
  uint16_t bits;
};

inline __half __double2half(double value) {
  const uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  if (std::isnan(value)) return {static_cast<uint16_t>(sign | 0x7e00)};
  const double magnitude = std::fabs(value);
  if (magnitude >= 65520.0) return {static_cast<uint16_t>(sign | 0x7c00)};  // 65504 + half an ulp: infinity
  if (magnitude == 0.0) return {sign};
  int exponent;
  std::frexp(magnitude, &exponent);  // magnitude in [2^(exponent-1), 2^exponent)
  // The result's unit in the last place: 2^(exponent-11) for normals, 2^-24 below them.
  const int ulp_exponent = exponent - 11 > -24 ? exponent - 11 : -24;
  const double ulps = std::nearbyint(std::ldexp(magnitude, -ulp_exponent));  // ties to even
  // Biased exponent field (ulp_exponent + 25) and the ulps above the implicit 1024; a carry
  // into the exponent (ulps == 2048) and the subnormals (exponent field 1, ulps < 1024,
  // which sums to the subnormal's bits) both come out right.
  return {static_cast<uint16_t>(sign | (((ulp_exponent + 25) << 10) + static_cast<int>(ulps) - 1024))};
}

inline __half __float2half(float value) { return __double2half(value); }  // float -> double is exact

inline float __half2float(__half h) {
  const int exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  const float sign = (h.bits & 0x8000) ? -1.0f : 1.0f;
  if (exponent == 0x1f) return mantissa ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}
