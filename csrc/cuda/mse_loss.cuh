// Torch-free interface of the CUDA mse_loss_and_grad kernel: a params struct of plain
// pointers and sizes, and a launcher that takes the stream. mse_loss_cuda.cpp fills it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace al_ext::cuda {

struct MseLossParams {
  const void* input = nullptr;   // n elements of `type`, contiguous
  const void* target = nullptr;  // n elements of `type`, contiguous
  void* grad = nullptr;          // n elements of `type`: 2 (input - target) / n
  void* loss = nullptr;          // 1 element of `type`: mean((input - target)^2)
  double* partial = nullptr;     // mse_loss_partial_count(n) doubles of scratch
  int64_t n = 0;
  FloatType type = FloatType::kFloat32;
};

// Scratch the launcher needs. A function of n alone, so that the reduction order,
// and with it the result, does not depend on the device: the kernel is deterministic.
int mse_loss_partial_count(int64_t n);

cudaError_t launch_mse_loss_and_grad(const MseLossParams& params, cudaStream_t stream);

}  // namespace al_ext::cuda
