// CUDA glue of the dense block ops: the shared core (../ops/dense_block_core.h) with GEMMs
// through cuBLAS (via ATen) and the torch-free kernels of dense_block.cu between them, all on
// the current stream. The update forms gather every gradient, then apply Adam or SGD to all
// ten tensors in one multi-tensor launch, which itself refuses a step with a non-finite loss:
// nothing in them waits for the device.
//
// compute_dtype=bfloat16 over float32 parameters, as on the CPU: the GEMMs take bfloat16
// operands (cuBLAS accumulates in float32), the activations and the gradients between the
// GEMMs are stored in bfloat16 (as under autocast), and the kernels between the GEMMs compute
// in float32 and write the losses in float32. The weight gradients come out of their GEMM in
// float32 (mm's out_dtype), the bias gradients are summed into float32, and the update runs on
// float32 parameters, gradients and state, rewriting the kept bfloat16 copies of the weights
// (compute_weights) as it stores each parameter.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../ops/dense_block.h"
#include "../ops/dense_block_core.h"
#include "../ops/ops.h"
#include "dense_block.cuh"
#include "glue.h"

namespace al_ext {
namespace {

cuda::ActivationKind to_kind(Activation a) {
  switch (a) {
    case Activation::kElu: return cuda::ActivationKind::kElu;
    case Activation::kRelu: return cuda::ActivationKind::kRelu;
    case Activation::kSigmoid: return cuda::ActivationKind::kSigmoid;
    case Activation::kTanh: return cuda::ActivationKind::kTanh;
    case Activation::kIdentity: return cuda::ActivationKind::kIdentity;
  }
  return cuda::ActivationKind::kIdentity;
}

struct CudaKernels {
  const char* op;
  cudaStream_t stream;
  std::vector<at::Tensor>& grads;      // where linear_grad writes, in the parameters' dtype
  const cuda::MultiTensorUpdateParams* update = nullptr;  // the update forms: applied by finish()
  at::TensorList params, state1, state2;  // the parameters themselves (float32 master weights in bf16 compute)
  at::Tensor step_count;  // Adam's step_tensor form: read and advanced by the update's launch
  at::TensorList compute_copies;  // bf16 compute, update forms: the kept bf16 weights, rewritten by the update
  bool bf16_compute = false;      // bfloat16 activations, float32 losses (the parameters' dtype)

  // The losses are in the parameters' dtype: the activations' own, or float32 in bf16 compute.
  at::ScalarType loss_dtype(const at::Tensor& activations) const {
    return bf16_compute ? at::kFloat : activations.scalar_type();
  }

  // The GEMMs: cuBLAS through ATen (with cuBLASLt's bias+ReLU epilogue for ReLU).
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& c, Activation act) const {
    return linear_forward(x, w, c, act);
  }
  at::Tensor input_grad(const at::Tensor& dz, const at::Tensor& w) const { return at::mm(dz, w); }

  at::Tensor output_mse(const at::Tensor& out, const at::Tensor& target, Activation act, at::Tensor& dz,
                        at::Tensor& dtarget) const {
    at::Tensor loss = at::empty({}, out.options().dtype(loss_dtype(out)));
    at::Tensor partial = at::empty({cuda::reduction_blocks(out.numel())}, out.options().dtype(at::kDouble));
    cuda::OutputMseParams p;
    p.out = out.const_data_ptr();
    p.target = target.const_data_ptr();
    p.dz = dz.mutable_data_ptr();
    p.dtarget = dtarget.defined() ? dtarget.mutable_data_ptr() : nullptr;
    p.loss = loss.mutable_data_ptr();
    p.partial = partial.mutable_data_ptr<double>();
    p.n = out.numel();
    p.act = to_kind(act);
    p.type = to_float_type(out.scalar_type(), op);
    p.float32_loss = bf16_compute;
    check_launch(cuda::launch_output_mse_backward(p, stream), op, "the MSE backward kernel");
    return loss;
  }

  at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, at::Tensor& dz) const {
    at::Tensor loss = at::empty({}, logits.options().dtype(loss_dtype(logits)));
    at::Tensor partial = at::empty({logits.size(0)}, logits.options().dtype(at::kDouble));
    cuda::CrossEntropyParams p;
    p.logits = logits.const_data_ptr();
    p.target = target.const_data_ptr();
    p.dz = dz.mutable_data_ptr();
    p.loss = loss.mutable_data_ptr();
    p.partial = partial.mutable_data_ptr<double>();
    p.rows = logits.size(0);
    p.cols = logits.size(1);
    p.type = to_float_type(logits.scalar_type(), op);
    p.float32_loss = bf16_compute;
    check_launch(cuda::launch_cross_entropy_backward(p, stream), op, "the cross-entropy backward kernel");
    return loss;
  }

  void activation_backward(at::Tensor& grad, const at::Tensor& y, Activation act, const at::Tensor& addend) const {
    cuda::ActivationBackwardParams p;
    p.grad = grad.mutable_data_ptr();
    p.y = y.const_data_ptr();
    p.addend = addend.defined() ? addend.const_data_ptr() : nullptr;
    p.n = grad.numel();
    p.act = to_kind(act);
    p.type = to_float_type(grad.scalar_type(), op);
    check_launch(cuda::launch_activation_backward(p, stream), op, "the activation backward kernel");
  }

  // The gradient form returns gradients, so it must say on the host that they are unusable.
  // The update forms never wait for the device: their update kernel reads the losses and
  // refuses a non-finite step itself (finish), and the caller sees the returned losses.
  bool proceed(const at::Tensor& loss_as, const at::Tensor& loss_ae) const {
    if (update == nullptr) refuse_non_finite_losses(loss_as, loss_ae);
    return true;
  }

  // dW = dz^T x and dc = dz summed over rows, in the gradients' dtype. In bf16 compute dz and
  // x are bfloat16 and the gradients float32: cuBLAS accumulates in float32 and writes its sum
  // unrounded (mm's out_dtype, torch >= 2.8), where autocast would round dW to bfloat16 first;
  // the bias sums read bfloat16 and add in float32.
  void linear_grad(int w, const at::Tensor& dz, const at::Tensor& x) const {
    at::Tensor& weight_grad = grads[w];
    at::Tensor& bias_grad = grads[w + 1];
    if (weight_grad.scalar_type() == dz.scalar_type()) {
      at::mm_out(weight_grad, dz.t(), x);
    } else {
      at::mm_out(weight_grad, dz.t(), x, weight_grad.scalar_type());
    }
    at::sum_out(bias_grad, dz, {0}, /*keepdim=*/false, bias_grad.scalar_type());
  }

  void finish(const at::Tensor& loss_as, const at::Tensor& loss_ae) const {
    if (update == nullptr) return;
    cuda::MultiTensorUpdateParams p = *update;
    p.loss_as = loss_as.const_data_ptr();
    p.loss_ae = loss_ae.const_data_ptr();
    p.count = kDenseParams;
    for (int i = 0; i < kDenseParams; ++i) {
      p.tensors[i] = {params[i].mutable_data_ptr(), grads[i].const_data_ptr(), state1[i].mutable_data_ptr(),
                      state2.empty() ? nullptr : state2[i].mutable_data_ptr(), params[i].numel(),
                      i < kParamWg ? 0 : 1,
                      compute_copies.empty() ? nullptr : compute_copies[i].mutable_data_ptr()};
    }
    if (step_count.defined()) {
      p.step_count = step_count.mutable_data_ptr();
      p.step_count_is_double = step_count.scalar_type() == at::kDouble;
    }
    check_launch(cuda::launch_multi_tensor_update(p, stream), op, "the multi-tensor update kernels");
  }
};

void check_cuda(const char* op, const at::Tensor& s_prev) {
  TORCH_CHECK(s_prev.is_cuda(), op, ": CUDA kernel got s_prev on ", s_prev.device());
}

// The shared core with the CUDA kernels: in the parameters' dtype, or, for compute_dtype=
// bfloat16, over the bfloat16 operands (bf16_operands) while `params`, which the update forms
// update, stay the float32 master weights.
DenseBlockOutputs run_on_cuda(const char* op, const at::Tensor& s_prev_arg, const at::Tensor& t_prev_arg,
                              at::TensorList params, const DenseBlockConfig& cfg, std::vector<at::Tensor>& grads,
                              const cuda::MultiTensorUpdateParams* update, at::TensorList state1,
                              at::TensorList state2, const at::Tensor& step_count = {},
                              at::TensorList compute_copies = {}) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not to be recorded
  const c10::cuda::CUDAGuard guard(s_prev_arg.device());
  const at::Tensor s_prev = s_prev_arg.contiguous(), t_prev = t_prev_arg.contiguous();
  to_float_type(s_prev.scalar_type(), op);  // refuses other dtypes with the op's name
  CudaKernels kernels{op,     c10::cuda::getCurrentCUDAStream(), grads,          update,          params,
                      state1, state2,                            step_count,     compute_copies, cfg.bf16_compute};
  if (!cfg.bf16_compute) return run_dense_block(s_prev, t_prev, params, cfg, kernels);
  const Bf16Operands in = bf16_operands(s_prev, t_prev, params, compute_copies);
  return run_dense_block(in.s_prev, in.t_prev, in.params, cfg, kernels);
}

std::vector<at::Tensor> empty_like_each(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : tensors) out.push_back(at::empty_like(t));
  return out;
}

cuda::FloatType param_type(at::TensorList params, const char* op) { return to_float_type(params[0].scalar_type(), op); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> dense_block_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, c10::string_view x_activation,
    c10::string_view h_activation, c10::string_view variant, c10::string_view ae_loss,
    std::optional<at::ScalarType> compute_dtype) {
  constexpr const char* op = "al_ext::dense_block_step";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  check_cuda(op, s_prev);
  std::vector<at::Tensor> grads = empty_like_each(params);  // float32 in bf16 compute, as the parameters
  DenseBlockOutputs out = run_on_cuda(op, s_prev, t_prev, params, cfg, grads, nullptr, {}, {});
  return {out.s, out.t, out.loss_as, out.loss_ae, grads};
}

namespace {

// Both Adam forms: the step number from the host (`step`), or read on the device from
// `step_count`, which the update then advances. The kernel forms the bias corrections.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, double step, const at::Tensor& step_count, double lr_fb, double lr_gh, double beta1,
    double beta2, double eps, c10::string_view x_activation, c10::string_view h_activation,
    c10::string_view variant, c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  constexpr const char* op = "al_ext::dense_block_adam_step_";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  // Before check_cuda: CPU tensors with a CUDA counter dispatch here, and the message must
  // name the counter, as the CPU kernel's does.
  if (step_count.defined()) check_step_count(op, step_count, s_prev.device());
  check_cuda(op, s_prev);
  check_compute_weights(op, params, cfg, compute_weights);
  check_adam_state(op, params, exp_avg, exp_avg_sq, compute_weights, step, lr_fb, lr_gh, beta1, beta2, eps);
  check_weight_decay(op, weight_decay);
  cuda::MultiTensorUpdateParams update;
  update.kind = cuda::UpdateKind::kAdam;
  update.beta1 = beta1;
  update.beta2 = beta2;
  update.eps = eps;
  update.step = step;
  update.lr[0] = lr_fb;
  update.lr[1] = lr_gh;
  update.weight_decay = weight_decay;
  update.decoupled_weight_decay = decoupled_weight_decay;
  update.type = param_type(params, op);
  std::vector<at::Tensor> grads = empty_like_each(params);
  DenseBlockOutputs out = run_on_cuda(op, s_prev, t_prev, params, cfg, grads, &update, exp_avg, exp_avg_sq,
                                      step_count, compute_weights.value_or(at::TensorList()));
  return {out.s, out.t, out.loss_as, out.loss_ae};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, double step, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
    c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  return adam_step_cuda(s_prev, t_prev, params, exp_avg, exp_avg_sq, step, at::Tensor(), lr_fb, lr_gh, beta1, beta2,
                        eps, x_activation, h_activation, variant, ae_loss, weight_decay, decoupled_weight_decay,
                        compute_dtype, compute_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_counted_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step, double lr_fb, double lr_gh, double beta1, double beta2,
    double eps, c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  // The host's step number is only a placeholder here (1 passes the checks): the kernel reads `step`.
  return adam_step_cuda(s_prev, t_prev, params, exp_avg, exp_avg_sq, 1.0, step, lr_fb, lr_gh, beta1, beta2, eps,
                        x_activation, h_activation, variant, ae_loss, weight_decay, decoupled_weight_decay,
                        compute_dtype, compute_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_sgd_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList momentum_buffer,
    double lr_fb, double lr_gh, double momentum, c10::string_view x_activation, c10::string_view h_activation,
    c10::string_view variant, c10::string_view ae_loss, double weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  constexpr const char* op = "al_ext::dense_block_sgd_step_";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  check_cuda(op, s_prev);
  check_compute_weights(op, params, cfg, compute_weights);
  check_sgd_state(op, params, momentum_buffer, compute_weights, lr_fb, lr_gh, momentum);
  check_weight_decay(op, weight_decay);
  cuda::MultiTensorUpdateParams update;
  update.kind = cuda::UpdateKind::kSgd;
  update.momentum = momentum;
  update.lr[0] = lr_fb;
  update.lr[1] = lr_gh;
  update.weight_decay = weight_decay;
  update.type = param_type(params, op);
  std::vector<at::Tensor> grads = empty_like_each(params);
  DenseBlockOutputs out = run_on_cuda(op, s_prev, t_prev, params, cfg, grads, &update, momentum_buffer, {}, {},
                                      compute_weights.value_or(at::TensorList()));
  return {out.s, out.t, out.loss_as, out.loss_ae};
}

}  // namespace al_ext
