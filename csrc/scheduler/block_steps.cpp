#include "block_steps.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <memory>

namespace al_ext::scheduler {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

StepResult to_step_result(Outputs out) {
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

// Whether the op refused the step (a non-finite loss changes nothing). Known on the host
// only: reading a CUDA loss would wait for the device, which counts its steps itself.
bool refused_on_host(const StepResult& out) {
  return out.loss_as.is_cpu() &&
         !(std::isfinite(out.loss_as.item<double>()) && std::isfinite(out.loss_ae.item<double>()));
}

// The spec is shared by the step's copies and its learning rates change between calls.
void advance_learning_rates(DenseBlockSpec& spec) {
  if (spec.next_lrs) std::tie(spec.lr_fb, spec.lr_gh) = spec.next_lrs();
}

std::optional<at::TensorList> compute_weights(const DenseBlockSpec& spec) {
  if (spec.compute_weights.empty()) return std::nullopt;
  return at::TensorList(spec.compute_weights);
}

}  // namespace

BlockStep fused_adam_block_step(DenseBlockSpec spec_arg, std::vector<at::Tensor> exp_avg,
                                std::vector<at::Tensor> exp_avg_sq, std::vector<at::Tensor> steps, double beta1,
                                double beta2, double eps, bool decoupled_weight_decay, at::Tensor step_count) {
  using Signature = Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                            double, double, double, double, double, double, c10::string_view, c10::string_view,
                            c10::string_view, c10::string_view, double, bool,
                            std::optional<at::ScalarType>, std::optional<at::TensorList>);
  using CountedSignature = Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                   at::TensorList, const at::Tensor&, double, double, double, double, double,
                                   c10::string_view, c10::string_view, c10::string_view, c10::string_view, double,
                                   bool, std::optional<at::ScalarType>, std::optional<at::TensorList>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("al_ext::dense_block_adam_step_", "").typed<Signature>();
  static const auto counted_op = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("al_ext::dense_block_adam_step_", "step_tensor")
                                     .typed<CountedSignature>();
  TORCH_CHECK_VALUE(step_count.defined() || !steps.empty(), "fused_adam_block_step: steps must hold the parameters' "
                    "step counts (one-element tensors), or step_count the device's; got neither");
  auto spec = std::make_shared<DenseBlockSpec>(std::move(spec_arg));
  if (step_count.defined()) {
    return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
      StepResult out = to_step_result(counted_op.call(
          s_prev, t_prev, spec->params, exp_avg, exp_avg_sq, step_count, spec->lr_fb, spec->lr_gh, beta1, beta2, eps,
          spec->x_activation, spec->h_activation, spec->variant, spec->ae_loss, spec->weight_decay,
          decoupled_weight_decay, spec->compute_dtype, compute_weights(*spec)));
      advance_learning_rates(*spec);
      return out;
    };
  }
  return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    const double step = steps.front().item<double>() + 1;
    StepResult out = to_step_result(op.call(s_prev, t_prev, spec->params, exp_avg, exp_avg_sq, step, spec->lr_fb,
                                            spec->lr_gh, beta1, beta2, eps, spec->x_activation, spec->h_activation,
                                            spec->variant, spec->ae_loss, spec->weight_decay,
                                            decoupled_weight_decay, spec->compute_dtype, compute_weights(*spec)));
    if (!refused_on_host(out)) {  // a refused step does not count
      for (const at::Tensor& counter : steps) counter.add_(1);
      advance_learning_rates(*spec);
    }
    return out;
  };
}

BlockStep fused_sgd_block_step(DenseBlockSpec spec_arg, std::vector<at::Tensor> momentum_buffer, double momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("al_ext::dense_block_sgd_step_", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                                            double, double, double, c10::string_view, c10::string_view,
                                            c10::string_view, c10::string_view, double,
                                            std::optional<at::ScalarType>, std::optional<at::TensorList>)>();
  auto spec = std::make_shared<DenseBlockSpec>(std::move(spec_arg));
  return [=](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    StepResult out = to_step_result(op.call(s_prev, t_prev, spec->params, momentum_buffer, spec->lr_fb, spec->lr_gh,
                                            momentum, spec->x_activation, spec->h_activation, spec->variant,
                                            spec->ae_loss, spec->weight_decay, spec->compute_dtype,
                                            compute_weights(*spec)));
    if (!refused_on_host(out)) advance_learning_rates(*spec);
    return out;
  };
}

}  // namespace al_ext::scheduler
