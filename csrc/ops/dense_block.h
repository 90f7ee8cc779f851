// What the CPU and CUDA kernels of the dense block ops share: the parameter layout, the
// parsed configuration, the Adam coefficients, and the argument checks (so that both
// devices reject bad input with the same words).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace al_ext {

// Index of each weight in the params list; its bias follows it.
// W_f (H, d_x), W_b1 (B, H), W_b2 (D, B), W_g (D, d_y), W_h (d_y, D).
constexpr int kParamWf = 0, kParamWb1 = 2, kParamWb2 = 4, kParamWg = 6, kParamWh = 8, kDenseParams = 10;
inline const char* dense_param_name(int i) {
  static const char* names[] = {"W_f", "c_f", "W_b1", "c_b1", "W_b2", "c_b2", "W_g", "c_g", "W_h", "c_h"};
  return names[i];
}

enum class Activation { kElu, kRelu, kSigmoid, kTanh, kIdentity };

struct DenseBlockConfig {
  Activation x_activation = Activation::kElu;
  Activation h_activation = Activation::kSigmoid;
  bool variant_b = false;
  bool cross_entropy = false;
  // compute_dtype=bfloat16 over float32 parameters: the GEMMs take bfloat16 operands, while
  // the parameters, the optimiser's state, the update and the losses stay float32.
  bool bf16_compute = false;
};

struct DenseBlockOutputs {
  at::Tensor s, t, loss_as, loss_ae;
};

inline DenseBlockConfig parse_dense_block_config(const char* op, c10::string_view x_activation,
                                                 c10::string_view h_activation, c10::string_view variant,
                                                 c10::string_view ae_loss) {
  DenseBlockConfig cfg;
  if (x_activation == "elu") cfg.x_activation = Activation::kElu;
  else if (x_activation == "relu") cfg.x_activation = Activation::kRelu;
  else if (x_activation == "sigmoid") cfg.x_activation = Activation::kSigmoid;
  else if (x_activation == "tanh") cfg.x_activation = Activation::kTanh;
  else TORCH_CHECK(false, op, ": x_activation must be 'elu', 'relu', 'sigmoid' or 'tanh', got '", x_activation, "'");
  if (h_activation == "sigmoid") cfg.h_activation = Activation::kSigmoid;
  else if (h_activation == "identity") cfg.h_activation = Activation::kIdentity;
  else TORCH_CHECK(false, op, ": h_activation must be 'sigmoid' or 'identity', got '", h_activation, "'");
  TORCH_CHECK(variant == "A" || variant == "B", op, ": variant must be 'A' or 'B', got '", variant, "'");
  cfg.variant_b = variant == "B";
  TORCH_CHECK(ae_loss == "mse" || ae_loss == "cross_entropy", op,
              ": ae_loss must be 'mse' or 'cross_entropy', got '", ae_loss, "'");
  cfg.cross_entropy = ae_loss == "cross_entropy";
  TORCH_CHECK(!cfg.cross_entropy || cfg.h_activation == Activation::kIdentity, op,
              ": ae_loss='cross_entropy' needs h_activation='identity' (h must emit logits)");
  return cfg;
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* why) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", why, "), got ", t.sizes());
}

// Whether a step computes in bfloat16 over float32 master weights. compute_dtype None (or the
// parameters' own dtype) is the step in the parameters' dtype.
inline bool wants_bf16_compute(const char* op, at::TensorList params, std::optional<at::ScalarType> compute_dtype) {
  if (!compute_dtype || params.empty() || !params[0].defined() || *compute_dtype == params[0].scalar_type()) {
    return false;
  }
  TORCH_CHECK(*compute_dtype == at::kBFloat16, op, ": compute_dtype must be None (the parameters' dtype) or "
              "torch.bfloat16, got ", *compute_dtype);
  TORCH_CHECK(params[0].scalar_type() == at::kFloat, op, ": compute_dtype=torch.bfloat16 keeps float32 master "
              "weights: the parameters must be float32, got ", params[0].scalar_type());
  return true;
}

// `bf16_compute`: the parameters are float32, and s_prev and t_prev each float32 or bfloat16
// (a previous bf16 step's outputs); else all share s_prev's dtype.
// Two tensors that an op writes in place (or writes one and reads the other) must not share
// memory: an update through one would change the other mid-step.
inline void check_own_memory(const char* op, const at::Tensor& a, const std::string& a_name, const at::Tensor& b,
                             const std::string& b_name) {
  const auto overlap = at::get_overlap_status(a, b);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op, ": ",
                    a_name, " and ", b_name, " share memory; each must be a tensor of its own");
}

inline void check_dense_block_inputs(const char* op, const at::Tensor& s_prev, const at::Tensor& t_prev,
                                     at::TensorList params, bool bf16_compute = false) {
  TORCH_CHECK(params.size() == kDenseParams, op, ": params must hold the 10 tensors W_f, c_f, W_b1, c_b1, W_b2, "
              "c_b2, W_g, c_g, W_h, c_h; got ", params.size());
  TORCH_CHECK(s_prev.dim() == 2 && s_prev.size(0) > 0, op, ": s_prev must be a non-empty 2-D batch (N, d_x), got shape ",
              s_prev.sizes());
  TORCH_CHECK(t_prev.dim() == 2 && t_prev.size(0) == s_prev.size(0), op, ": t_prev must be 2-D with s_prev's ",
              s_prev.size(0), " rows, got shape ", t_prev.sizes());
  TORCH_CHECK(is_supported_float_type(s_prev.scalar_type()), op, ": s_prev must be floating point, got ",
              s_prev.scalar_type());
  if (bf16_compute) {
    for (const auto& [tensor, name] : {std::pair{&s_prev, "s_prev"}, std::pair{&t_prev, "t_prev"}}) {
      TORCH_CHECK(tensor->scalar_type() == at::kFloat || tensor->scalar_type() == at::kBFloat16, op, ": ", name,
                  " must be float32 or bfloat16 with compute_dtype=torch.bfloat16, got ", tensor->scalar_type());
    }
  }
  const at::ScalarType param_dtype = bf16_compute ? at::kFloat : s_prev.scalar_type();
  const char* param_dtype_is = bf16_compute ? "float32 (master weights)" : "s_prev's dtype";
  for (const auto& [tensor, name] : {std::pair{&t_prev, "t_prev"}}) {
    TORCH_CHECK(bf16_compute || tensor->scalar_type() == s_prev.scalar_type(), op, ": ", name,
                " must have s_prev's dtype ", s_prev.scalar_type(), ", got ", tensor->scalar_type());
    TORCH_CHECK(tensor->device() == s_prev.device(), op, ": ", name, " must be on s_prev's device ", s_prev.device(),
                ", got ", tensor->device());
  }
  for (int i = 0; i < kDenseParams; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] (", dense_param_name(i), ") is undefined");
    TORCH_CHECK(p.scalar_type() == param_dtype, op, ": params[", i, "] (", dense_param_name(i),
                ") must have ", param_dtype_is, " ", param_dtype, ", got ", p.scalar_type());
    TORCH_CHECK(p.device() == s_prev.device(), op, ": params[", i, "] (", dense_param_name(i),
                ") must be on s_prev's device ", s_prev.device(), ", got ", p.device());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] (", dense_param_name(i), ") must be contiguous");
  }
  const int64_t dx = s_prev.size(1), dy = t_prev.size(1);
  TORCH_CHECK(params[kParamWf].dim() == 2 && params[kParamWb1].dim() == 2 && params[kParamWb2].dim() == 2 &&
              params[kParamWg].dim() == 2 && params[kParamWh].dim() == 2, op, ": every weight must be 2-D (out, in)");
  const int64_t H = params[kParamWf].size(0), B = params[kParamWb1].size(0), D = params[kParamWg].size(0);
  TORCH_CHECK_VALUE(dx > 0 && dy > 0 && H > 0 && B > 0 && D > 0, op, ": every width must be at least 1, got d_x = ",
                    dx, ", d_y = ", dy, ", H = ", H, ", B = ", B, ", D = ", D);
  check_shape(op, params[kParamWf], "W_f", {H, dx}, "H x d_x, d_x = s_prev's width");
  check_shape(op, params[kParamWf + 1], "c_f", {H}, "H = W_f's rows");
  check_shape(op, params[kParamWb1], "W_b1", {B, H}, "B x H, H = W_f's rows");
  check_shape(op, params[kParamWb1 + 1], "c_b1", {B}, "B = W_b1's rows");
  check_shape(op, params[kParamWb2], "W_b2", {D, B}, "D x B, D = W_g's rows, B = W_b1's rows");
  check_shape(op, params[kParamWb2 + 1], "c_b2", {D}, "D = W_g's rows");
  check_shape(op, params[kParamWg], "W_g", {D, dy}, "D x d_y, d_y = t_prev's width");
  check_shape(op, params[kParamWg + 1], "c_g", {D}, "D = W_g's rows");
  check_shape(op, params[kParamWh], "W_h", {dy, D}, "d_y x D: h reconstructs t_prev");
  check_shape(op, params[kParamWh + 1], "c_h", {dy}, "d_y = t_prev's width");
  for (int i = 0; i < kDenseParams; ++i) {  // an update in place through one would change another
    for (int j = i + 1; j < kDenseParams; ++j) {
      check_own_memory(op, params[i], dense_param_name(i), params[j], dense_param_name(j));
    }
  }
}

// What every dense block op checks first, on any device: the configuration strings, then
// the inputs and the parameters. Returns the parsed configuration.
inline DenseBlockConfig check_dense_block_call(const char* op, const at::Tensor& s_prev, const at::Tensor& t_prev,
                                               at::TensorList params, c10::string_view x_activation,
                                               c10::string_view h_activation, c10::string_view variant,
                                               c10::string_view ae_loss,
                                               std::optional<at::ScalarType> compute_dtype = std::nullopt) {
  DenseBlockConfig cfg = parse_dense_block_config(op, x_activation, h_activation, variant, ae_loss);
  cfg.bf16_compute = wants_bf16_compute(op, params, compute_dtype);
  check_dense_block_inputs(op, s_prev, t_prev, params, cfg.bf16_compute);
  return cfg;
}

// The update forms' compute_weights: the parameters rounded to bfloat16, kept by the caller
// between steps, with compute_dtype=bfloat16 only.
inline void check_compute_weights(const char* op, at::TensorList params, const DenseBlockConfig& cfg,
                                  const std::optional<at::TensorList>& compute_weights) {
  if (!compute_weights) return;
  TORCH_CHECK(cfg.bf16_compute, op, ": compute_weights go with compute_dtype=torch.bfloat16 (they are the "
              "parameters rounded to bfloat16)");
  TORCH_CHECK(compute_weights->size() == kDenseParams, op, ": compute_weights must hold one tensor per parameter "
              "(10), got ", compute_weights->size());
  for (int i = 0; i < kDenseParams; ++i) {
    const at::Tensor& c = (*compute_weights)[i];
    TORCH_CHECK(c.defined() && c.scalar_type() == at::kBFloat16 && c.sizes() == params[i].sizes() &&
                c.device() == params[i].device() && c.is_contiguous(), op, ": compute_weights[", i,
                "] must be a contiguous bfloat16 tensor shaped like params[", i, "] (", dense_param_name(i), ")");
  }
}

// Whether both losses are finite (reads them: on a device, waits for it).
inline bool losses_are_finite(const at::Tensor& loss_as, const at::Tensor& loss_ae) {
  return std::isfinite(loss_as.item<double>()) && std::isfinite(loss_ae.item<double>());
}

// Refuses a step whose loss is not finite, in words the caller can act on: the gradient form,
// which has no update to leave out. Reading the losses waits for the device.
inline void refuse_non_finite_losses(const at::Tensor& loss_as, const at::Tensor& loss_ae) {
  const double as_value = loss_as.item<double>(), ae_value = loss_ae.item<double>();
  TORCH_CHECK(std::isfinite(as_value) && std::isfinite(ae_value), "al_ext::dense_block_step: non-finite loss (L_as = ",
              as_value, ", L_ae = ", ae_value, "): s_prev, t_prev or the parameters hold NaN or inf, or training "
              "diverged; no parameter was changed");
}

// The optimiser step applied to a parameter group: torch.optim.Adam's (no amsgrad; weight
// decay as L2 or, as AdamW, decoupled) for one step number, or torch.optim.SGD's with
// momentum (no dampening, no Nesterov) and L2 weight decay.
enum class OptimizerKind { kAdam, kSgd };
struct OptimizerUpdate {
  OptimizerKind kind = OptimizerKind::kAdam;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double step_size = 0.0;                  // Adam: lr / (1 - beta1^step)
  double inv_bias_correction2_sqrt = 1.0;  // Adam: 1 / sqrt(1 - beta2^step)
  double lr = 0.0, momentum = 0.0;         // SGD
  // Both are exact no-ops at their defaults (g + 0 p, 1 p), so the loops need no branch.
  double l2_weight_decay = 0.0;  // g <- g + wd p, before the moments (Adam, SGD)
  double decay_factor = 1.0;     // p <- (1 - lr wd) p, before the update (AdamW)
};

inline OptimizerUpdate adam_update(double step, double lr, double beta1, double beta2, double eps,
                                   double weight_decay = 0.0, bool decoupled_weight_decay = false) {
  OptimizerUpdate u;
  u.beta1 = beta1;
  u.beta2 = beta2;
  u.eps = eps;
  u.step_size = lr / (1.0 - std::pow(beta1, step));
  u.inv_bias_correction2_sqrt = 1.0 / std::sqrt(1.0 - std::pow(beta2, step));
  if (decoupled_weight_decay) u.decay_factor = 1.0 - lr * weight_decay;
  else u.l2_weight_decay = weight_decay;
  return u;
}

inline OptimizerUpdate sgd_update(double lr, double momentum, double weight_decay = 0.0) {
  OptimizerUpdate u;
  u.kind = OptimizerKind::kSgd;
  u.lr = lr;
  u.momentum = momentum;
  u.l2_weight_decay = weight_decay;
  return u;
}

inline void check_weight_decay(const char* op, double weight_decay) {
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op,
              ": weight_decay must be a finite number >= 0, got ", weight_decay);
}

inline void check_state_like_params(const char* op, at::TensorList params, at::TensorList state, const char* name) {
  TORCH_CHECK(state.size() == kDenseParams, op, ": ", name, " must hold one tensor per parameter (10), got ",
              state.size());
  for (int i = 0; i < kDenseParams; ++i) {
    TORCH_CHECK(state[i].sizes() == params[i].sizes() && state[i].scalar_type() == params[i].scalar_type() &&
                state[i].device() == params[i].device() && state[i].is_contiguous(), op, ": ", name, "[", i,
                "] must be a contiguous tensor like params[", i, "] (", dense_param_name(i), ")");
  }
}

// Every tensor an update writes (the parameters, the optimiser's state, the kept bf16
// weights) must be apart from every other: two names for one buffer (one exp_avg for two
// parameters of a shape, a state that is a parameter) would take two updates mid-step.
// Only tensors on one storage can overlap, so the check sorts by storage and compares
// neighbours: a few dozen tensors per step.
inline void check_written_apart(const char* op, std::initializer_list<std::pair<at::TensorList, const char*>> lists) {
  struct Written {
    const void* storage;
    size_t order;  // in the lists as given: an error names the first pair that overlaps in that order
    const at::Tensor* tensor;
    std::string name;
  };
  std::vector<Written> written;
  for (const auto& [tensors, list] : lists) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].defined() && tensors[i].has_storage() && tensors[i].numel() > 0) {
        written.push_back({tensors[i].storage().unsafeGetStorageImpl(), written.size(), &tensors[i],
                           std::string(list) == "params" ? dense_param_name(static_cast<int>(i))
                                                         : std::string(list) + "[" + std::to_string(i) + "]"});
      }
    }
  }
  std::sort(written.begin(), written.end(), [](const Written& a, const Written& b) {
    return std::tie(a.storage, a.order) < std::tie(b.storage, b.order);
  });
  const Written* clash[2] = {nullptr, nullptr};
  for (size_t first = 0; first < written.size(); ++first) {
    for (size_t other = first + 1; other < written.size() && written[other].storage == written[first].storage; ++other) {
      const auto overlap = at::get_overlap_status(*written[first].tensor, *written[other].tensor);
      const bool overlaps = overlap == at::MemOverlapStatus::Full || overlap == at::MemOverlapStatus::Partial;
      if (overlaps && (!clash[0] || std::tie(written[first].order, written[other].order) <
                                        std::tie(clash[0]->order, clash[1]->order))) {
        clash[0] = &written[first];
        clash[1] = &written[other];
      }
    }
  }
  if (clash[0]) check_own_memory(op, *clash[0]->tensor, clash[0]->name, *clash[1]->tensor, clash[1]->name);
}

// Zero is a rate: schedules reach it (LinearLR to 0, CosineAnnealingLR's end), as torch's optimisers allow.
inline void check_learning_rates(const char* op, double lr_fb, double lr_gh) {
  TORCH_CHECK_VALUE(std::isfinite(lr_fb) && lr_fb >= 0, op, ": lr_fb must be a finite number >= 0, got ", lr_fb);
  TORCH_CHECK_VALUE(std::isfinite(lr_gh) && lr_gh >= 0, op, ": lr_gh must be a finite number >= 0, got ", lr_gh);
}

inline void check_sgd_state(const char* op, at::TensorList params, at::TensorList momentum_buffer,
                            const std::optional<at::TensorList>& compute_weights, double lr_fb, double lr_gh,
                            double momentum) {
  check_learning_rates(op, lr_fb, lr_gh);
  TORCH_CHECK(momentum >= 0 && momentum < 1, op, ": momentum must lie in [0, 1), got ", momentum);
  check_state_like_params(op, params, momentum_buffer, "momentum_buffer");
  check_written_apart(op, {{params, "params"}, {momentum_buffer, "momentum_buffer"},
                           {compute_weights.value_or(at::TensorList()), "compute_weights"}});
}

inline void check_adam_state(const char* op, at::TensorList params, at::TensorList exp_avg,
                             at::TensorList exp_avg_sq, const std::optional<at::TensorList>& compute_weights,
                             double step, double lr_fb, double lr_gh, double beta1, double beta2, double eps) {
  TORCH_CHECK(step >= 1 && std::floor(step) == step, op, ": step must be the step number after this update (1, 2, ...), got ", step);
  check_learning_rates(op, lr_fb, lr_gh);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, op, ": beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, op, ": beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  check_state_like_params(op, params, exp_avg, "exp_avg");
  check_state_like_params(op, params, exp_avg_sq, "exp_avg_sq");
  check_written_apart(op, {{params, "params"}, {exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"},
                           {compute_weights.value_or(at::TensorList()), "compute_weights"}});
}

// The step_tensor form's counter: the steps taken so far, one float32 (as torch.optim.Adam's
// state["step"]) or float64 element on the parameters' device (which the op's other checks
// make s_prev's); the op advances it in place.
inline void check_step_count(const char* op, const at::Tensor& step, c10::Device params_device) {
  TORCH_CHECK(step.defined() && step.numel() == 1, op, ": step must be a one-element tensor (the steps taken so "
              "far), got ", step.defined() ? step.sizes() : at::IntArrayRef{});
  TORCH_CHECK(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble, op,
              ": step must be float32 or float64, got ", step.scalar_type());
  TORCH_CHECK(step.device() == params_device, op, ": step must be on the parameters' device ", params_device,
              ", got ", step.device());
}

}  // namespace al_ext
