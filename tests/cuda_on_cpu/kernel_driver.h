// The C interface of kernel_driver.cpp: plain host pointers and sizes, so that Python's
// ctypes (tests/cuda_on_cpu/driver.py mirrors DriverUpdate) and sanitize_kernels.cpp can
// call it. `type` and `activation` are al_ext::cuda::FloatType and ActivationKind values.
#pragma once

#include <cstdint>

extern "C" {

// One launch_multi_tensor_update call: up to 10 tensors of n[i] elements each, in group[i];
// compute_copy[i], if set, is param[i]'s bfloat16 copy, which the update rewrites.
struct DriverUpdate {
  int type, kind, count;  // kind: 0 Adam, 1 SGD
  void* param[10];
  const void* grad[10];
  void* state1[10];
  void* state2[10];  // Adam only
  int64_t n[10];
  int group[10];
  double beta1, beta2, eps, momentum, weight_decay;
  int decoupled_weight_decay;
  double lr[2], step;  // step: Adam's step number, unless step_count is set
  const void* loss_as;  // optional guard: one element of `type` each
  const void* loss_ae;
  void* step_count;  // optional: one float32 or float64 element
  int step_count_is_double;
  void* compute_copy[10];  // optional, each: n[i] bfloat16 elements
};

int driver_reduction_blocks(int64_t n);
// float32_loss: the loss is written as float32, whatever `type` (the kernels' float32_loss).
int driver_output_mse(int type, const void* out, const void* target, void* dz, void* dtarget, void* loss, int64_t n,
                      int activation, int float32_loss);
int driver_cross_entropy(int type, const void* logits, const void* target, void* dz, void* loss, int64_t rows,
                         int64_t cols, int float32_loss);
int driver_activation_backward(int type, void* grad, const void* y, const void* addend, int64_t n, int activation);
int driver_multi_tensor_update(const DriverUpdate* update);
}
