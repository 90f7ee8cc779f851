// Declarations of every al_ext kernel. The schemas live in registration.cpp;
// each op has one CPU and (in a CUDA build) one CUDA kernel under the same name.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace al_ext {

// Mean squared error over all elements and its gradient with respect to `input`,
// computed in one pass over memory: (mean((input - target)^2), 2 (input - target) / N).
std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cpu(const at::Tensor& input,
                                                         const at::Tensor& target);
#ifdef AL_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cuda(const at::Tensor& input,
                                                          const at::Tensor& target);
#endif

}  // namespace al_ext
