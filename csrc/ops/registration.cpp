// Every al_ext op schema, and which kernel serves it on which device. compute_dtype on the
// dense block ops: None computes in the parameters' dtype; torch.bfloat16 over float32
// parameters takes bf16 GEMM operands with float32 master weights (CPU and CUDA); the
// update forms' compute_weights, if given, are those operands kept between steps (the
// parameters rounded to bf16), which the op reads and rewrites from the updated parameters. Python reaches
// them as torch.ops.al_ext.<name>; fake (meta) kernels and autograd formulas are
// registered in al_ext/ops.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(al_ext, m) {
  m.def("mse_loss_and_grad(Tensor input, Tensor target) -> (Tensor loss, Tensor grad_input)");
  m.def(
      "dense_block_step(Tensor s_prev, Tensor t_prev, Tensor[] params, str x_activation, str h_activation, "
      "str variant, str ae_loss, ScalarType? compute_dtype=None) "
      "-> (Tensor s, Tensor t, Tensor loss_as, Tensor loss_ae, Tensor[] grads)");
  m.def(
      "dense_block_adam_step_(Tensor s_prev, Tensor t_prev, Tensor(a!)[] params, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, float step, float lr_fb, float lr_gh, float beta1, float beta2, float eps, "
      "str x_activation, str h_activation, str variant, str ae_loss, float weight_decay=0.0, "
      "bool decoupled_weight_decay=False, ScalarType? compute_dtype=None, Tensor(e!)[]? compute_weights=None) "
      "-> (Tensor s, Tensor t, Tensor loss_as, Tensor loss_ae)");
  m.def(
      "dense_block_adam_step_.step_tensor(Tensor s_prev, Tensor t_prev, Tensor(a!)[] params, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor(d!) step, float lr_fb, float lr_gh, float beta1, float beta2, float eps, "
      "str x_activation, str h_activation, str variant, str ae_loss, float weight_decay=0.0, "
      "bool decoupled_weight_decay=False, ScalarType? compute_dtype=None, Tensor(e!)[]? compute_weights=None) "
      "-> (Tensor s, Tensor t, Tensor loss_as, Tensor loss_ae)");
  m.def(
      "dense_block_sgd_step_(Tensor s_prev, Tensor t_prev, Tensor(a!)[] params, Tensor(b!)[] momentum_buffer, "
      "float lr_fb, float lr_gh, float momentum, str x_activation, str h_activation, str variant, str ae_loss, "
      "float weight_decay=0.0, ScalarType? compute_dtype=None, Tensor(e!)[]? compute_weights=None) "
      "-> (Tensor s, Tensor t, Tensor loss_as, Tensor loss_ae)");
}

TORCH_LIBRARY_IMPL(al_ext, CPU, m) {
  m.impl("mse_loss_and_grad", &al_ext::mse_loss_and_grad_cpu);
  m.impl("dense_block_step", &al_ext::dense_block_step_cpu);
  m.impl("dense_block_adam_step_", &al_ext::dense_block_adam_step_cpu);
  m.impl("dense_block_adam_step_.step_tensor", &al_ext::dense_block_adam_step_counted_cpu);
  m.impl("dense_block_sgd_step_", &al_ext::dense_block_sgd_step_cpu);
}

#ifdef AL_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(al_ext, CUDA, m) {
  m.impl("mse_loss_and_grad", &al_ext::mse_loss_and_grad_cuda);
  m.impl("dense_block_step", &al_ext::dense_block_step_cuda);
  m.impl("dense_block_adam_step_", &al_ext::dense_block_adam_step_cuda);
  m.impl("dense_block_adam_step_.step_tensor", &al_ext::dense_block_adam_step_counted_cuda);
  m.impl("dense_block_sgd_step_", &al_ext::dense_block_sgd_step_cuda);
}
#endif
