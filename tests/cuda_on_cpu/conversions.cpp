// The CPU runtime's float16 and bfloat16 conversions over whole arrays, for
// tests/test_cuda_kernels_on_cpu.py to compare with torch's and numpy's: every kernel result
// in those types passes through them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

extern "C" {

void convert_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
void convert_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half(in[i]).bits;
}
void convert_double_to_half(const double* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __double2half(in[i]).bits;
}
void convert_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}
void convert_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16(in[i]).bits;
}
}
