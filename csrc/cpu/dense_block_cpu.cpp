// CPU kernels of al_ext::dense_block_step, dense_block_adam_step_ and dense_block_sgd_step_:
// one dense AL block's forward pass, both local losses and every gradient, and optionally
// the optimiser's update, in one call (see al_ext/reference.py: dense_block_step for the definition).
//
// The algorithm (order of the GEMMs, losses, refusal of a non-finite loss) is the shared
// core in ../ops/dense_block_core.h; this file supplies the CPU passes between the GEMMs,
// and the GEMMs: oneDNN's for the forward and input gradients (onednn_gemm.h), MKL's,
// one thread per tile, for the weight gradients.
// Each loss, its gradient and the output activation's derivative are one pass; each
// activation derivative is one pass, written through the layer's output.
// The update forms never materialise a weight gradient: each gradient is computed in
// cache-sized tiles of rows, and each tile updates its rows of the weight and of the
// optimiser's state at once, while it is still in cache. Every input gradient (dX = dZ W) is
// computed before its weight is updated. All reductions run in a fixed order, so results
// repeat bit for bit for a given number of threads.
//
// compute_dtype=bfloat16 (float32 parameters, a CPU with AVX512_BF16 or AMX): every GEMM takes
// bfloat16 operands with float32 accumulation (oneDNN), as torch.autocast("cpu", bfloat16)
// runs the reference; the weights are rounded to bfloat16 once per step. The activations and
// the gradients between the GEMMs are stored in bfloat16, as under autocast, since they are
// the next GEMM's operands; every pass between the GEMMs computes in float32. The losses, the
// master weights, the optimiser's state and the update stay float32. The kernels below are
// templates over T, the parameters' and the arithmetic's type, and A, the activations' type
// (T itself, or bfloat16).
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../ops/checks.h"
#include "../ops/dense_block.h"
#include "../ops/dense_block_core.h"
#include "../ops/ops.h"
#include "onednn_gemm.h"
#include "simd.h"

namespace al_ext {
namespace {

// Weight-gradient tiles of about this many elements (256 KiB of float) at batch kTileBatch,
// and proportionally more at larger batches: small enough to stay in cache between the GEMM
// that writes them and the Adam update that reads them.
constexpr int64_t kTileElements = 64 * 1024, kTileBatch = 32;
// ...but never thinner than this: MKL's kernel is slow on a GEMM of a few rows.
constexpr int64_t kMinTileRows = 32;
// bf16 tiles hold 4x the elements (2x the bytes): a bf16 GEMM of a few rows is dominated by
// its per-call cost (one thread at batch 32: 99 GFLOP/s at 64 rows of 1024, 161 at 256), and
// the whole bf16 step ran ~5% faster at batch 32 with 4x, alike at 128 (a noisy, shared machine).
constexpr int64_t kBf16TileScale = 4;

// d act / d z, written through the output y = act(z), so no pre-activation is kept.
template <typename T> inline __attribute__((always_inline)) T activation_slope(Activation a, T y) {
  switch (a) {
    case Activation::kElu: return y > T(0) ? T(1) : y + T(1);
    case Activation::kRelu: return y > T(0) ? T(1) : T(0);
    case Activation::kSigmoid: return y * (T(1) - y);
    case Activation::kTanh: return T(1) - y * y;
    case Activation::kIdentity: return T(1);
  }
  return T(1);
}

// Rows of an (N, O) matrix in parallel; each row is one task.
template <typename F> void for_each_row(int64_t rows, F&& body) {
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) body(r);
  });
}

// g <- (g + addend) * act'(y) over n elements; the activation is a template parameter so
// that each loop body is branch-free and vectorises.
// Elements of type E are read as, and computed in, T (float for bfloat16 storage).
template <typename T, typename E> inline __attribute__((always_inline)) T as(E x) { return static_cast<T>(x); }

template <Activation Act, typename T, typename E>
inline __attribute__((always_inline)) void slope_loop(E* __restrict__ g, const E* __restrict__ y,
                                                      const E* __restrict__ addend, int64_t n) {
  if (addend != nullptr) {
    for (int64_t i = 0; i < n; ++i) g[i] = E((as<T>(g[i]) + as<T>(addend[i])) * activation_slope(Act, as<T>(y[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) g[i] = E(as<T>(g[i]) * activation_slope(Act, as<T>(y[i])));
  }
}

template <typename T, typename E>
inline __attribute__((always_inline)) void slope_range(E* g, const E* y, const E* addend, int64_t n, Activation a) {
  switch (a) {
    case Activation::kElu: return slope_loop<Activation::kElu, T>(g, y, addend, n);
    case Activation::kRelu: return slope_loop<Activation::kRelu, T>(g, y, addend, n);
    case Activation::kSigmoid: return slope_loop<Activation::kSigmoid, T>(g, y, addend, n);
    case Activation::kTanh: return slope_loop<Activation::kTanh, T>(g, y, addend, n);
    case Activation::kIdentity: return slope_loop<Activation::kIdentity, T>(g, y, addend, n);
  }
}

AL_EXT_CLONE_FOR_WIDE_SIMD
void activation_backward_range(float* g, const float* y, const float* addend, int64_t n, Activation a) {
  slope_range<float>(g, y, addend, n, a);
}
void activation_backward_range(double* g, const double* y, const double* addend, int64_t n, Activation a) {
  slope_range<double>(g, y, addend, n, a);
}
AL_EXT_CLONE_FOR_WIDE_SIMD
void activation_backward_range(c10::BFloat16* g, const c10::BFloat16* y, const c10::BFloat16* addend, int64_t n,
                               Activation a) {
  slope_range<float>(g, y, addend, n, a);
}

// grad <- (grad + addend) * act'(y), in place: from d/dy to d/dz.
template <typename A> void activation_backward_(at::Tensor& grad, const at::Tensor& y, Activation act,
                                                const at::Tensor& addend) {
  A* gp = grad.mutable_data_ptr<A>();
  const A* yp = y.const_data_ptr<A>();
  const A* ap = addend.defined() ? addend.const_data_ptr<A>() : nullptr;
  at::parallel_for(0, grad.numel(), 16384, [&](int64_t first, int64_t last) {
    activation_backward_range(gp + first, yp + first, ap ? ap + first : nullptr, last - first, act);
  });
}

double sum_in_order(const std::vector<double>& parts) {
  double total = 0.0;
  for (double p : parts) total += p;
  return total;
}

// MSE(out, target) with out = act(z): returns the sum of squares and writes dL/dz;
// `dtarget`, if defined, receives dL/dtarget (variant B's gradient into t).
// out, target, dz and dtarget are of type A, computed in T.
template <typename T, typename A> double mse_backward(const at::Tensor& out, const at::Tensor& target, Activation act,
                                                      at::Tensor& dz, at::Tensor& dtarget) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const T scale = T(2) / static_cast<T>(rows * cols);
  const A* op = out.const_data_ptr<A>();
  const A* tp = target.const_data_ptr<A>();
  A* dp = dz.mutable_data_ptr<A>();
  A* dtp = dtarget.defined() ? dtarget.mutable_data_ptr<A>() : nullptr;
  std::vector<double> row_sums(rows, 0.0);
  for_each_row(rows, [&](int64_t r) {
    double sum = 0.0;
    for (int64_t j = r * cols; j < (r + 1) * cols; ++j) {
      const T o = as<T>(op[j]);
      const T diff = o - as<T>(tp[j]);
      sum += static_cast<double>(diff) * static_cast<double>(diff);
      dp[j] = A(diff * scale * activation_slope(act, o));
      if (dtp) dtp[j] = A(-diff * scale);
    }
    row_sums[r] = sum;
  });
  return sum_in_order(row_sums);
}

// Softmax cross-entropy of logits against target probabilities (one-hot rows): returns the
// summed loss and writes dL/dlogits of the mean.
// logits, target and dz are of type A, computed in T (and double).
template <typename T, typename A> double cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                                                at::Tensor& dz) {
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const A* lp = logits.const_data_ptr<A>();
  const A* tp = target.const_data_ptr<A>();
  A* dp = dz.mutable_data_ptr<A>();
  std::vector<double> row_sums(rows, 0.0);
  for_each_row(rows, [&](int64_t r) {
    const A* l = lp + r * cols;
    const A* p = tp + r * cols;
    A* d = dp + r * cols;
    T top = as<T>(l[0]);
    for (int64_t j = 1; j < cols; ++j) top = std::max(top, as<T>(l[j]));
    double denom = 0.0, mass = 0.0;
    for (int64_t j = 0; j < cols; ++j) denom += std::exp(static_cast<double>(as<T>(l[j]) - top));
    const double log_denom = std::log(denom);
    double loss = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      loss -= static_cast<double>(as<T>(p[j])) * (static_cast<double>(as<T>(l[j]) - top) - log_denom);
      mass += as<T>(p[j]);
    }
    for (int64_t j = 0; j < cols; ++j) {
      const double softmax = std::exp(static_cast<double>(as<T>(l[j]) - top) - log_denom);
      d[j] = A(static_cast<T>((softmax * mass - as<T>(p[j])) / static_cast<double>(rows)));
    }
    row_sums[r] = loss;
  });
  return sum_in_order(row_sums);
}

template <typename T, typename G>
inline __attribute__((always_inline)) void adam_update_body(T* __restrict__ p, const G* __restrict__ g,
                                                            T* __restrict__ m, T* __restrict__ v, int64_t n,
                                                            const OptimizerUpdate& u) {
  // 1 - beta is formed in double and rounded once, as torch.optim.Adam's Python scalars are
  // (in float, 1 - 0.999 is off by 1.3e-5 relative).
  const T beta1 = u.beta1, beta2 = u.beta2, eps = u.eps;
  const T one_minus_beta1 = 1.0 - u.beta1, one_minus_beta2 = 1.0 - u.beta2;
  const T step_size = u.step_size, inv_bc2_sqrt = u.inv_bias_correction2_sqrt;
  const T wd = u.l2_weight_decay, decay = u.decay_factor;
  for (int64_t i = 0; i < n; ++i) {
    const T grad = as<T>(g[i]) + wd * p[i];
    m[i] = beta1 * m[i] + one_minus_beta1 * grad;
    v[i] = beta2 * v[i] + one_minus_beta2 * grad * grad;
    p[i] = p[i] * decay - step_size * m[i] / (std::sqrt(v[i]) * inv_bc2_sqrt + eps);
  }
}

// torch.optim.SGD with momentum and no dampening: g += wd p; buf = momentum * buf + g;
// p -= lr * buf (a zero buffer makes the first step buf = g, as torch's does).
template <typename T, typename G>
inline __attribute__((always_inline)) void sgd_update_body(T* __restrict__ p, const G* __restrict__ g,
                                                           T* __restrict__ buf, int64_t n, const OptimizerUpdate& u) {
  const T lr = u.lr, momentum = u.momentum, wd = u.l2_weight_decay;
  for (int64_t i = 0; i < n; ++i) {
    buf[i] = momentum * buf[i] + (as<T>(g[i]) + wd * p[i]);
    p[i] -= lr * buf[i];
  }
}

// Memory-bound, and called on tiles still in cache: worth the widest vectors.
AL_EXT_CLONE_FOR_WIDE_SIMD
void apply_update(const OptimizerUpdate& u, float* p, const float* g, float* s1, float* s2, int64_t n) {
  if (u.kind == OptimizerKind::kAdam) adam_update_body(p, g, s1, s2, n, u);
  else sgd_update_body(p, g, s1, n, u);
}
void apply_update(const OptimizerUpdate& u, double* p, const double* g, double* s1, double* s2, int64_t n) {
  if (u.kind == OptimizerKind::kAdam) adam_update_body(p, g, s1, s2, n, u);
  else sgd_update_body(p, g, s1, n, u);
}
// compute_dtype=bfloat16: float32 master weights and state, a bfloat16 weight gradient (the
// GEMM's result, rounded as autocast rounds it), and float32 bias gradients.
AL_EXT_CLONE_FOR_WIDE_SIMD
void apply_update(const OptimizerUpdate& u, float* p, const c10::BFloat16* g, float* s1, float* s2, int64_t n) {
  if (u.kind == OptimizerKind::kAdam) adam_update_body(p, g, s1, s2, n, u);
  else sgd_update_body(p, g, s1, n, u);
}

// The columns of a bfloat16 (rows, cols) matrix summed in float, each in row order (ATen's
// sum over dim 0 with a float result took ~1 ms at 32 x 5120 here).
AL_EXT_CLONE_FOR_WIDE_SIMD
void column_sums_range(const c10::BFloat16* x, float* out, int64_t rows, int64_t cols, int64_t first, int64_t last) {
  for (int64_t j = first; j < last; ++j) out[j] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* row = x + r * cols;
    for (int64_t j = first; j < last; ++j) out[j] += static_cast<float>(row[j]);
  }
}

// dz summed over the rows, in T.
template <typename T, typename A> at::Tensor bias_gradient(const at::Tensor& dz_arg) {
  if constexpr (std::is_same_v<T, A>) {
    return dz_arg.sum(0);
  } else {
    static_assert(std::is_same_v<T, float> && std::is_same_v<A, c10::BFloat16>);
    const at::Tensor dz = dz_arg.contiguous();
    const int64_t rows = dz.size(0), cols = dz.size(1);
    at::Tensor out = at::empty({cols}, dz.options().dtype(at::kFloat));
    const c10::BFloat16* x = dz.const_data_ptr<c10::BFloat16>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, cols, 1024, [&](int64_t first, int64_t last) {
      column_sums_range(x, o, rows, cols, first, last);
    });
    return out;
  }
}

// copy <- p rounded to bfloat16: the next step's GEMM operand, written while p is in cache.
AL_EXT_CLONE_FOR_WIDE_SIMD
void round_to_bf16(c10::BFloat16* __restrict__ copy, const float* __restrict__ p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) copy[i] = c10::BFloat16(p[i]);
}

// Where a Linear layer's gradient goes: into gradient tensors, or straight into the optimiser.
// params are the master weights, of type T; dz and x are of type A.
template <typename T, typename A> struct GradientSink {
  at::TensorList params;
  std::vector<at::Tensor>* grads = nullptr;  // gradient form
  at::TensorList state1, state2;             // update form: exp_avg and exp_avg_sq, or the momentum buffer
  OptimizerUpdate update_fb, update_gh;
  at::TensorList compute_copies;  // update form, bf16 compute: rewritten from the updated parameters, if given

  // After a tile of params[i] is updated: its bf16 copy, if kept.
  void refresh_copy(int i, int64_t offset, int64_t n) const {
    if constexpr (std::is_same_v<T, float>) {
      if (compute_copies.empty()) return;
      round_to_bf16(compute_copies[i].mutable_data_ptr<c10::BFloat16>() + offset,
                    params[i].const_data_ptr<float>() + offset, n);
    }
  }

  T* state(at::TensorList list, int i, int64_t offset) const {
    return list.empty() ? nullptr : list[i].mutable_data_ptr<T>() + offset;
  }

  // dW = dz^T x and dc = sum of dz over rows, for the weight at params[w] and bias params[w + 1].
  void linear(int w, const at::Tensor& dz, const at::Tensor& x) const {
    if (grads != nullptr) {
      (*grads)[w] = cpu_matmul(dz.t(), x).to(c10::CppTypeToScalarType<T>::value);
      (*grads)[w + 1] = bias_gradient<T, A>(dz);
      return;
    }
    const OptimizerUpdate& u = w < kParamWg ? update_fb : update_gh;
    const at::Tensor& weight = params[w];
    const int64_t out = weight.size(0), in = weight.size(1);
    // Each tile's GEMM reads all of x (batch x in), so tiles grow with the batch: the passes
    // over x stay as few as at batch 32, which the tile size was tuned for. (Fixed tiles made
    // the step 1.15x slower at batch 128 and slower than eager PyTorch at batch 512.)
    const int64_t scale = std::is_same_v<T, A> ? 1 : kBf16TileScale;
    const int64_t tile_elements = scale * kTileElements * std::max<int64_t>(1, dz.size(0) / kTileBatch);
    int64_t rows = std::min(out, std::max(kMinTileRows, tile_elements / in));
    // Tiles in a multiple of the threads, where the weight has the rows: parallel_for hands
    // each thread a contiguous run of tiles, so 5 tiles on 2 threads ran as 3 + 2, and a
    // weight of one tile (block 2's f at batch 128) ran on one thread while the other waited
    // (7 ms of the bf16 step at batch 128).
    const int64_t threads = at::get_num_threads();
    int64_t tiles = (out + rows - 1) / rows;
    if (tiles % threads != 0) {
      const int64_t balanced = std::min((tiles / threads + 1) * threads, std::max<int64_t>(1, out / kMinTileRows));
      rows = (out + balanced - 1) / balanced;
      tiles = (out + rows - 1) / rows;
    }
    at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
      at::Tensor tile = at::empty({rows, in}, x.options());
      for (int64_t k = first; k < last; ++k) {
        const int64_t r0 = k * rows, n = std::min(rows, out - r0);
        at::Tensor g = tile.narrow(0, 0, n);
        at::mm_out(g, dz.narrow(1, r0, n).t(), x);  // one thread: we are inside a parallel region
        const int64_t offset = r0 * in;
        apply_update(u, weight.mutable_data_ptr<T>() + offset, g.const_data_ptr<A>(), state(state1, w, offset),
                     state(state2, w, offset), n * in);
        refresh_copy(w, offset, n * in);
      }
    });
    const at::Tensor bias_grad = bias_gradient<T, A>(dz);
    apply_update(u, params[w + 1].mutable_data_ptr<T>(), bias_grad.const_data_ptr<T>(), state(state1, w + 1, 0),
                 state(state2, w + 1, 0), bias_grad.numel());
    refresh_copy(w + 1, 0, bias_grad.numel());
  }
};

// What the shared core (dense_block_core.h) needs between the GEMMs, on the CPU.
// The GEMMs' operands (x, w, c, dz) are of type A; the losses come out in T.
template <typename T, typename A> struct CpuKernels {
  const GradientSink<T, A>& sink;

  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& c, Activation act) const {
    return cpu_linear(x, w, c, act);
  }
  at::Tensor input_grad(const at::Tensor& dz, const at::Tensor& w) const { return cpu_matmul(dz, w); }
  at::Tensor output_mse(const at::Tensor& out, const at::Tensor& target, Activation act, at::Tensor& dz,
                        at::Tensor& dtarget) const {
    const double sum = mse_backward<T, A>(out, target, act, dz, dtarget);
    return at::scalar_tensor(sum / static_cast<double>(out.numel()), loss_options(out));
  }
  at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& target, at::Tensor& dz) const {
    const double sum = cross_entropy_backward<T, A>(logits, target, dz);
    return at::scalar_tensor(sum / static_cast<double>(logits.size(0)), loss_options(logits));
  }
  void activation_backward(at::Tensor& grad, const at::Tensor& y, Activation act, const at::Tensor& addend) const {
    activation_backward_<A>(grad, y, act, addend);
  }
  static at::TensorOptions loss_options(const at::Tensor& like) {
    return like.options().dtype(c10::CppTypeToScalarType<T>::value);
  }
  bool proceed(const at::Tensor& loss_as, const at::Tensor& loss_ae) const {
    if (sink.grads != nullptr) {
      refuse_non_finite_losses(loss_as, loss_ae);
      return true;
    }
    return losses_are_finite(loss_as, loss_ae);
  }
  void linear_grad(int w, const at::Tensor& dz, const at::Tensor& x) const { sink.linear(w, dz, x); }
  void finish(const at::Tensor&, const at::Tensor&) const {}
};

void check_cpu(const char* op, const at::Tensor& s_prev, const at::Tensor& param, const DenseBlockConfig& cfg) {
  TORCH_CHECK(s_prev.device().is_cpu(), op, ": CPU kernel got s_prev on ", s_prev.device());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", param.scalar_type());
  TORCH_CHECK(!cfg.bf16_compute || cpu_has_bf16_gemm(), op, ": compute_dtype=torch.bfloat16 needs a CPU that "
              "multiplies bfloat16 in hardware (AVX512_BF16 or AMX) and torch built with oneDNN; here bfloat16 "
              "GEMMs would be emulated, slower than float32. Use compute_dtype=None (float32)");
}

// The shared core with the CPU kernels, in the parameters' dtype or, for
// compute_dtype=bfloat16, with bfloat16 GEMM operands over float32 master weights.
template <typename Sink>
DenseBlockOutputs run_on_cpu(const at::Tensor& s_prev_arg, const at::Tensor& t_prev_arg, at::TensorList params,
                             const DenseBlockConfig& cfg, const Sink& sink_args) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not to be recorded
  const at::Tensor s_prev = s_prev_arg.contiguous(), t_prev = t_prev_arg.contiguous();
  if (cfg.bf16_compute) {
    const Bf16Operands in = bf16_operands(s_prev, t_prev, params, sink_args.compute_copies);
    const GradientSink<float, c10::BFloat16> sink = sink_args.template make<float, c10::BFloat16>();
    return run_dense_block(in.s_prev, in.t_prev, in.params, cfg, CpuKernels<float, c10::BFloat16>{sink});
  }
  DenseBlockOutputs out;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "dense_block_cpu", [&] {
    const GradientSink<scalar_t, scalar_t> sink = sink_args.template make<scalar_t, scalar_t>();
    out = run_dense_block(s_prev, t_prev, params, cfg, CpuKernels<scalar_t, scalar_t>{sink});
  });
  return out;
}

// What a GradientSink is made of, for either form; `make` fixes its types.
struct SinkArgs {
  at::TensorList params;
  std::vector<at::Tensor>* grads = nullptr;
  at::TensorList state1, state2;
  OptimizerUpdate update_fb, update_gh;
  at::TensorList compute_copies;
  template <typename T, typename A> GradientSink<T, A> make() const {
    return {params, grads, state1, state2, update_fb, update_gh, compute_copies};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> dense_block_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, c10::string_view x_activation,
    c10::string_view h_activation, c10::string_view variant, c10::string_view ae_loss,
    std::optional<at::ScalarType> compute_dtype) {
  constexpr const char* op = "al_ext::dense_block_step";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  check_cpu(op, s_prev, params[0], cfg);
  std::vector<at::Tensor> grads(params.size());  // filled by GradientSink::linear
  const DenseBlockOutputs out = run_on_cpu(s_prev, t_prev, params, cfg, SinkArgs{params, &grads});
  return {out.s, out.t, out.loss_as, out.loss_ae, grads};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, double step, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
    c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  constexpr const char* op = "al_ext::dense_block_adam_step_";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  check_cpu(op, s_prev, params[0], cfg);
  check_compute_weights(op, params, cfg, compute_weights);
  check_adam_state(op, params, exp_avg, exp_avg_sq, compute_weights, step, lr_fb, lr_gh, beta1, beta2, eps);
  check_weight_decay(op, weight_decay);
  const SinkArgs sink{params, nullptr, exp_avg, exp_avg_sq,
                      adam_update(step, lr_fb, beta1, beta2, eps, weight_decay, decoupled_weight_decay),
                      adam_update(step, lr_gh, beta1, beta2, eps, weight_decay, decoupled_weight_decay),
                      compute_weights.value_or(at::TensorList())};
  const DenseBlockOutputs out = run_on_cpu(s_prev, t_prev, params, cfg, sink);
  return {out.s, out.t, out.loss_as, out.loss_ae};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_adam_step_counted_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList exp_avg,
    at::TensorList exp_avg_sq, const at::Tensor& step, double lr_fb, double lr_gh, double beta1, double beta2,
    double eps, c10::string_view x_activation, c10::string_view h_activation, c10::string_view variant,
    c10::string_view ae_loss, double weight_decay, bool decoupled_weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  // Checked before it is read; the rest is checked by the step itself.
  check_step_count("al_ext::dense_block_adam_step_", step, s_prev.device());
  auto out = dense_block_adam_step_cpu(s_prev, t_prev, params, exp_avg, exp_avg_sq, step.item<double>() + 1, lr_fb,
                                       lr_gh, beta1, beta2, eps, x_activation, h_activation, variant, ae_loss,
                                       weight_decay, decoupled_weight_decay, compute_dtype, compute_weights);
  if (losses_are_finite(std::get<2>(out), std::get<3>(out))) step.add_(1);  // a refused step does not count
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_sgd_step_cpu(
    const at::Tensor& s_prev, const at::Tensor& t_prev, at::TensorList params, at::TensorList momentum_buffer,
    double lr_fb, double lr_gh, double momentum, c10::string_view x_activation, c10::string_view h_activation,
    c10::string_view variant, c10::string_view ae_loss, double weight_decay,
    std::optional<at::ScalarType> compute_dtype, std::optional<at::TensorList> compute_weights) {
  constexpr const char* op = "al_ext::dense_block_sgd_step_";
  const DenseBlockConfig cfg =
      check_dense_block_call(op, s_prev, t_prev, params, x_activation, h_activation, variant, ae_loss, compute_dtype);
  check_cpu(op, s_prev, params[0], cfg);
  check_compute_weights(op, params, cfg, compute_weights);
  check_sgd_state(op, params, momentum_buffer, compute_weights, lr_fb, lr_gh, momentum);
  check_weight_decay(op, weight_decay);
  const SinkArgs sink{params, nullptr, momentum_buffer, {}, sgd_update(lr_fb, momentum, weight_decay),
                      sgd_update(lr_gh, momentum, weight_decay), compute_weights.value_or(at::TensorList())};
  const DenseBlockOutputs out = run_on_cpu(s_prev, t_prev, params, cfg, sink);
  return {out.s, out.t, out.loss_as, out.loss_ae};
}

}  // namespace al_ext
