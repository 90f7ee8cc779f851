// See onednn_gemm.h.
#include "onednn_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/cpu/Utils.h>

#include <optional>
#include <string>

#include "../ops/dense_block_core.h"

namespace al_ext {
namespace {

// mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars,
// str? algorithm) -> Tensor: act(X W^T + B). Looked up once; absent from torch builds
// without oneDNN (USE_MKLDNN=0), where the ATen path is taken instead.
const std::optional<c10::OperatorHandle>& linear_pointwise_op() {
  static const std::optional<c10::OperatorHandle> op = [] {
    auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (handle && !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) handle.reset();
    return handle;
  }();
  return op;
}

// The post-op name oneDNN fuses for an activation, or nullptr when it has none.
const char* fused_post_op(Activation act) {
  switch (act) {
    case Activation::kRelu: return "relu";
    case Activation::kSigmoid: return "sigmoid";
    case Activation::kTanh: return "tanh";
    case Activation::kIdentity: return "none";
    case Activation::kElu: return nullptr;
  }
  return nullptr;
}

at::Tensor onednn_linear(const c10::OperatorHandle& op, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& bias, const char* post_op) {
  // A boxed call: the operator's C++ signature changed across torch releases, its schema did not.
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.defined() ? c10::IValue(bias) : c10::IValue());
  stack.emplace_back(std::string(post_op));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return std::move(stack[0]).toTensor();
}

}  // namespace

const char* cpu_gemm_library() { return linear_pointwise_op() ? "onednn" : "aten"; }

bool cpu_has_bf16_gemm() {
  static const bool has = [] {
    if (!linear_pointwise_op()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();  // cpuinfo's flags
    const auto flag = [&](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return flag("avx512_bf16") || flag("amx_bf16");
  }();
  return has;
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, Activation act) {
  const auto& op = linear_pointwise_op();
  const bool onednn_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  if (!op || !onednn_dtype) return linear_forward(x, w, bias, act);
  const char* post_op = fused_post_op(act);
  at::Tensor z = onednn_linear(*op, x, w, bias, post_op ? post_op : "none");
  return post_op ? z : apply_activation_(z, act);
}

}  // namespace al_ext
