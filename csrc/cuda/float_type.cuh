// Element types of the torch-free CUDA kernels, and their conversions to the float (or
// double) they compute in. Shared by every .cu file; no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace al_ext::cuda {

enum class FloatType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// float32, float16 and bfloat16 compute in float; float64 in double.
template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Accumulator<T>::type widen(T v) {
  return static_cast<typename Accumulator<T>::type>(v);
}
template <> __device__ __forceinline__ float widen<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T narrow(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half narrow<__half, float>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __half narrow<__half, double>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, double>(double v) {
  return __float2bfloat16(static_cast<float>(v));
}

// Launcher<T>::run(params, stream) for the element type named by `type`.
template <template <typename> class Launcher, typename Params>
cudaError_t dispatch_float_type(FloatType type, const Params& params, cudaStream_t stream) {
  switch (type) {
    case FloatType::kFloat32: return Launcher<float>::run(params, stream);
    case FloatType::kFloat64: return Launcher<double>::run(params, stream);
    case FloatType::kFloat16: return Launcher<__half>::run(params, stream);
    case FloatType::kBFloat16: return Launcher<__nv_bfloat16>::run(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace al_ext::cuda
