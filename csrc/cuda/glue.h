// What every CUDA glue file needs: the torch dtype as the kernels' FloatType, and a
// launch check whose message names the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "float_type.cuh"

namespace al_ext {

inline cuda::FloatType to_float_type(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::FloatType::kFloat32;
    case at::kDouble: return cuda::FloatType::kFloat64;
    case at::kHalf: return cuda::FloatType::kFloat16;
    case at::kBFloat16: return cuda::FloatType::kBFloat16;
    default:
      // A throw the compiler sees: TORCH_CHECK(false, ...) is an if statement, after which
      // some compilers warn that control reaches the end of this function (-Wreturn-type).
      C10_THROW_ERROR(Error, c10::str(op, ": the CUDA kernel takes float32, float64, float16 or bfloat16, got ", t));
  }
}

inline void check_launch(cudaError_t err, const char* op, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, op, ": launching ", kernel, " failed: ", cudaGetErrorString(err));
}

}  // namespace al_ext
