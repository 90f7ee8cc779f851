// The dense block step as an algorithm, the same on every device: the order of the GEMMs
// and of the passes between them. What each step runs on is supplied by a `Kernels`
// object of the device:
//   at::Tensor linear(x, w, c, act)                        act(x w^T + c), a layer's forward
//   at::Tensor input_grad(dz, w)                           dz w, a layer's input gradient
//   at::Tensor output_mse(out, target, act, dz, dtarget)   loss (0-dim); dz = dL/dz, dtarget optional
//   at::Tensor cross_entropy(logits, target, dz)           loss (0-dim); dz = dL/dlogits
//   void activation_backward(grad, y, act, addend)         grad <- (grad + addend) * act'(y)
//   bool proceed(loss_as, loss_ae)                         whether to go on to the gradients: a
//                                                          non-finite loss must change nothing, so
//                                                          it throws (gradient form), returns false
//                                                          (update form, host), or arranges it on
//                                                          the device and returns true (CUDA)
//   void linear_grad(w, dz, x)                             the gradient of params[w] (= dz^T x) and its bias
//   void finish(loss_as, loss_ae)                          after the last linear_grad
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_addmm_activation.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>

#include <cmath>
#include <vector>

#include "dense_block.h"

namespace al_ext {

// z <- act(z), in place, with ATen's own kernels (their exp is vectorised: a scalar exp
// cost more than fusing it saved).
inline at::Tensor& apply_activation_(at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kElu: at::elu_(z); break;
    case Activation::kRelu: at::relu_(z); break;
    case Activation::kSigmoid: at::sigmoid_(z); break;
    case Activation::kTanh: at::tanh_(z); break;
    case Activation::kIdentity: break;
  }
  return z;
}

// act(x W^T + c) through ATen, c optional: the bias rides in the GEMM (addmm), and so does
// ReLU (on CUDA, _addmm_activation is cuBLASLt's bias+ReLU epilogue; cuBLASLt has none for
// ELU, sigmoid or tanh).
inline at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& c, Activation act) {
  if (c.defined() && act == Activation::kRelu) return at::_addmm_activation(c, x, w.t());
  at::Tensor z = c.defined() ? at::addmm(c, x, w.t()) : at::mm(x, w.t());
  return apply_activation_(z, act);
}

// compute_dtype=bfloat16, on every device: the step's GEMM operands in bfloat16. The inputs
// rounded (a bf16 input, a previous bf16 step's output, is taken as it is), and the weights
// rounded once per step (each is read by its forward GEMM and by its input gradient's), or
// the caller's kept copies (compute_weights), which the update rewrites as it goes.
struct Bf16Operands {
  at::Tensor s_prev, t_prev;
  std::vector<at::Tensor> params;
};

inline Bf16Operands bf16_operands(const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params,
                                  at::TensorList kept) {
  Bf16Operands out{s_prev.to(at::kBFloat16), t_prev.to(at::kBFloat16), {}};
  if (!kept.empty()) {
    out.params = kept.vec();
    return out;
  }
  out.params.reserve(params.size());
  for (const at::Tensor& p : params) out.params.push_back(p.to(at::kBFloat16));
  return out;
}

template <typename Kernels>
DenseBlockOutputs run_dense_block(const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList P,
                                  const DenseBlockConfig& cfg, const Kernels& k) {
  // Forward: label side first, since the associative loss needs t.
  const at::Tensor t = k.linear(t_prev, P[kParamWg], P[kParamWg + 1], Activation::kSigmoid);
  const at::Tensor r = k.linear(t, P[kParamWh], P[kParamWh + 1], cfg.h_activation);
  const at::Tensor s = k.linear(s_prev, P[kParamWf], P[kParamWf + 1], cfg.x_activation);
  const at::Tensor u = k.linear(s, P[kParamWb1], P[kParamWb1 + 1], Activation::kSigmoid);
  const at::Tensor bhat = k.linear(u, P[kParamWb2], P[kParamWb2 + 1], Activation::kSigmoid);

  // Both losses and their gradients at the outputs, before any parameter changes.
  at::Tensor dz2 = at::empty_like(bhat);
  at::Tensor dt_from_as = cfg.variant_b ? at::empty_like(t) : at::Tensor();
  const at::Tensor loss_as = k.output_mse(bhat, t, Activation::kSigmoid, dz2, dt_from_as);
  at::Tensor dzh = at::empty_like(r);
  at::Tensor none;
  const at::Tensor loss_ae = cfg.cross_entropy ? k.cross_entropy(r, t_prev, dzh)
                                               : k.output_mse(r, t_prev, cfg.h_activation, dzh, none);
  // A step with a non-finite loss is refused whole, before any parameter changes: the caller
  // sees the losses.
  if (!k.proceed(loss_as, loss_ae)) return {s, t, loss_as, loss_ae};

  // x side, top down; each input gradient (dX = dZ W) before its weight's gradient is used.
  at::Tensor du = k.input_grad(dz2, P[kParamWb2]);
  k.linear_grad(kParamWb2, dz2, u);
  k.activation_backward(du, u, Activation::kSigmoid, at::Tensor());
  at::Tensor ds = k.input_grad(du, P[kParamWb1]);
  k.linear_grad(kParamWb1, du, s);
  k.activation_backward(ds, s, cfg.x_activation, at::Tensor());
  k.linear_grad(kParamWf, ds, s_prev);

  // Label side: h, then g (which in variant B also receives L_as's gradient through t).
  at::Tensor dt = k.input_grad(dzh, P[kParamWh]);
  k.linear_grad(kParamWh, dzh, t);
  k.activation_backward(dt, t, Activation::kSigmoid, dt_from_as);
  k.linear_grad(kParamWg, dt, t_prev);
  k.finish(loss_as, loss_ae);
  return {s, t, loss_as, loss_ae};
}

}  // namespace al_ext
