// Torch-free interface of the CUDA kernels of the dense block step: everything between the
// GEMMs (which go through cuBLAS, via ATen, in dense_block_cuda.cpp). Each takes a params
// struct of plain pointers and sizes and the stream to launch on.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.cuh"

namespace al_ext::cuda {

enum class ActivationKind : int { kElu, kRelu, kSigmoid, kTanh, kIdentity };

// MSE(out, target) over n elements with out = act(z): writes dz = dL/dz, and, if dtarget is
// set, dtarget = dL/dtarget (variant B's gradient into t); loss = the mean (one element).
// With act = kIdentity this is al_ext::mse_loss_and_grad, which launches it too.
// float32_loss: the loss is written as float32 whatever `type` is. compute_dtype=bfloat16
// keeps the losses float32 while the activations are bfloat16; the arithmetic is float's
// either way, so only the final rounding changes.
struct OutputMseParams {
  const void* out = nullptr;
  const void* target = nullptr;
  void* dz = nullptr;
  void* dtarget = nullptr;    // optional
  void* loss = nullptr;       // 1 element of `type`, or float32 with float32_loss
  double* partial = nullptr;  // reduction_blocks(n) doubles of scratch
  int64_t n = 0;
  ActivationKind act = ActivationKind::kSigmoid;
  FloatType type = FloatType::kFloat32;
  bool float32_loss = false;
};

// Softmax cross-entropy of logits (rows x cols) against target probabilities (one-hot
// rows): dz = dL/dlogits of the mean over rows; loss = that mean (one element).
// float32_loss as for OutputMseParams.
struct CrossEntropyParams {
  const void* logits = nullptr;
  const void* target = nullptr;
  void* dz = nullptr;
  void* loss = nullptr;       // 1 element of `type`, or float32 with float32_loss
  double* partial = nullptr;  // rows doubles of scratch
  int64_t rows = 0, cols = 0;
  FloatType type = FloatType::kFloat32;
  bool float32_loss = false;
};

// grad <- (grad + addend) * act'(y) over n elements, act' written through the output y.
struct ActivationBackwardParams {
  void* grad = nullptr;
  const void* y = nullptr;
  const void* addend = nullptr;  // optional
  int64_t n = 0;
  ActivationKind act = ActivationKind::kSigmoid;
  FloatType type = FloatType::kFloat32;
};

// One optimiser step over up to kMaxUpdateTensors tensors in a single launch, each tensor in
// one of two parameter groups, with torch's formulas (its coefficients formed in double and
// rounded once, as torch's Python scalars are):
// - Adam (torch.optim.Adam, no amsgrad; state1 = exp_avg, state2 = exp_avg_sq): weight decay
//   as L2 (g += wd p, before the moments) or, with decoupled_weight_decay, as AdamW's
//   (p *= 1 - lr wd, before the update, lr of the tensor's group);
// - SGD (torch.optim.SGD with momentum, no dampening or Nesterov; state1 = momentum buffer):
//   g += wd p, buf = momentum buf + g, p -= lr buf.
// If loss_as and loss_ae are set, the kernel reads them first and changes nothing unless both
// are finite: the step refuses a bad batch on the device, so the host need not wait for it.
// Adam's step number is `step`, or, if step_count is set, read from the device (the steps
// taken so far, plus one), and a kernel after the update then counts the step if it was
// taken; the bias corrections are computed in the kernel from it either way. Nothing in the
// launch then depends on the step, so a CUDA graph can replay it.
// compute_copy (optional, per tensor): a bfloat16 copy of the parameter, which the kernel
// rewrites from each updated value as it stores it. compute_dtype=bfloat16 keeps the
// parameters, their gradients and the optimiser's state in float32 (master weights: in bf16,
// 0.999 v rounds back to v) and takes the next step's GEMM operands from these copies, so
// rounding the weights costs no pass of its own.
constexpr int kMaxUpdateTensors = 10;
enum class UpdateKind : int { kAdam, kSgd };
struct UpdateTensor {
  void* param = nullptr;
  const void* grad = nullptr;
  void* state1 = nullptr;
  void* state2 = nullptr;
  int64_t n = 0;
  int group = 0;
  void* compute_copy = nullptr;  // optional: n bfloat16 elements
};
struct MultiTensorUpdateParams {
  UpdateTensor tensors[kMaxUpdateTensors];
  int count = 0;
  UpdateKind kind = UpdateKind::kAdam;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, momentum = 0.0;
  double lr[2] = {0.0, 0.0};                  // per group
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;        // Adam only: AdamW's decay instead of L2
  double step = 1.0;                          // Adam: this step's number, unless step_count is set
  const void* loss_as = nullptr;              // optional guard: one element of `type` each
  const void* loss_ae = nullptr;
  void* step_count = nullptr;                 // Adam, optional: one float32 or float64 element
  bool step_count_is_double = false;
  FloatType type = FloatType::kFloat32;
};

// Scratch (doubles) that launch_output_mse_backward needs; a function of n alone, so that
// the reduction order, and with it the result, does not depend on the device.
int reduction_blocks(int64_t n);

cudaError_t launch_output_mse_backward(const OutputMseParams& params, cudaStream_t stream);
cudaError_t launch_cross_entropy_backward(const CrossEntropyParams& params, cudaStream_t stream);
cudaError_t launch_activation_backward(const ActivationBackwardParams& params, cudaStream_t stream);
cudaError_t launch_multi_tensor_update(const MultiTensorUpdateParams& params, cudaStream_t stream);

}  // namespace al_ext::cuda
