// Declarations of every al_ext kernel. The schemas live in registration.cpp;
// each op has one CPU and (in a CUDA build) one CUDA kernel under the same name.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

namespace al_ext {

// Mean squared error over all elements and its gradient with respect to `input`,
// computed in one pass over memory: (mean((input - target)^2), 2 (input - target) / N).
std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cpu(const at::Tensor& input,
                                                         const at::Tensor& target);
// One dense AL block: forward pass, both local losses and the gradient of every parameter.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> dense_block_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, c10::string_view x_activation,
    c10::string_view h_activation, c10::string_view variant, c10::string_view ae_loss,
    std::optional<at::ScalarType> compute_dtype);

// The same, with the Adam update applied in place instead of returning gradients (weight
// decay as torch.optim.Adam's: L2, or decoupled as AdamW's). A step whose loss is not
// finite changes nothing and returns that loss (it does not throw): so do the other update forms.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, double step, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
    c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);

// The same, with the step number kept in a tensor (`step`: the steps taken so far), which the
// op advances when it takes the step. On CUDA the number never visits the host, so the step
// can be captured in a CUDA graph and replayed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_counted_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step, double lr_fb, double lr_gh, double beta1, double beta2,
    double eps, c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);

// The same, with torch.optim.SGD's momentum update (and L2 weight decay) applied in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_sgd_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList momentum_buffer,
    double lr_fb, double lr_gh, double momentum, c10::string_view x_activation, c10::string_view h_activation,
    c10::string_view variant, c10::string_view ae_loss, double weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);

#ifdef AL_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cuda(const at::Tensor& input,
                                                          const at::Tensor& target);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> dense_block_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, c10::string_view x_activation,
    c10::string_view h_activation, c10::string_view variant, c10::string_view ae_loss,
    std::optional<at::ScalarType> compute_dtype);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, double step, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
    c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_counted_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step, double lr_fb, double lr_gh, double beta1, double beta2,
    double eps, c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_sgd_step_cuda(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList momentum_buffer,
    double lr_fb, double lr_gh, double momentum, c10::string_view x_activation, c10::string_view h_activation,
    c10::string_view variant, c10::string_view ae_loss, double weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights);
#endif

}  // namespace al_ext
