// Argument checks shared by the CPU and CUDA kernels, so that both reject bad
// input with the same message that names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace al_ext {

inline bool is_supported_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `input` and `target` of a loss: same shape, dtype and device, floating point, non-empty.
inline void check_loss_pair(const char* op, const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(input.defined() && target.defined(), op, ": input and target must be defined tensors");
  TORCH_CHECK(is_supported_float_type(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), op, ": target must have the dtype of input (",
              input.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK(target.device() == input.device(), op, ": target must be on the device of input (",
              input.device(), "), got ", target.device());
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target must have the shape of input ", input.sizes(),
              ", got ", target.sizes());
  TORCH_CHECK(input.numel() > 0, op, ": input must not be empty (the mean of no elements is undefined)");
}

}  // namespace al_ext
