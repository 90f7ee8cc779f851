#include "block_steps.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace al_ext::scheduler {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

StepResult to_step_result(Outputs out) {
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

}  // namespace

BlockStep fused_adam_block_step(DenseBlockSpec spec, std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq,
                           std::vector<at::Tensor> steps, double beta1, double beta2, double eps,
                           at::Tensor step_count) {
  using Signature = Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                            double, double, double, double, double, double, c10::string_view, c10::string_view,
                            c10::string_view, c10::string_view);
  using CountedSignature = Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                   at::TensorList, const at::Tensor&, double, double, double, double, double,
                                   c10::string_view, c10::string_view, c10::string_view, c10::string_view);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("al_ext::dense_block_adam_step_", "").typed<Signature>();
  static const auto counted_op = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("al_ext::dense_block_adam_step_", "step_tensor")
                                     .typed<CountedSignature>();
  if (step_count.defined()) {
    return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
      return to_step_result(counted_op.call(s_prev, t_prev, spec.params, exp_avg, exp_avg_sq, step_count, spec.lr_fb,
                                            spec.lr_gh, beta1, beta2, eps, spec.x_activation, spec.h_activation,
                                            spec.variant, spec.ae_loss));
    };
  }
  return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    const double step = steps.front().item<double>() + 1;
    Outputs out = op.call(s_prev, t_prev, spec.params, exp_avg, exp_avg_sq, step, spec.lr_fb, spec.lr_gh, beta1,
                          beta2, eps, spec.x_activation, spec.h_activation, spec.variant, spec.ae_loss);
    for (const at::Tensor& counter : steps) counter.add_(1);  // only once the step has succeeded
    return to_step_result(std::move(out));
  };
}

BlockStep fused_sgd_block_step(DenseBlockSpec spec, std::vector<at::Tensor> momentum_buffer, double momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("al_ext::dense_block_sgd_step_", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                            double, double, double, c10::string_view, c10::string_view,
                                            c10::string_view, c10::string_view)>();
  return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    return to_step_result(op.call(s_prev, t_prev, spec.params, momentum_buffer, spec.lr_fb, spec.lr_gh, momentum,
                                  spec.x_activation, spec.h_activation, spec.variant, spec.ae_loss));
  };
}

}  // namespace al_ext::scheduler
