// CPU kernel of al_ext::mse_loss_and_grad: one pass over input and target gives both the
// loss and its gradient.
//
// Determinism: the sum is split into chunks of a fixed size (not one per thread), each
// chunk summed in a fixed order, then the chunk sums added in order, so the result is the
// same bit for bit whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "../ops/checks.h"
#include "../ops/ops.h"
#include "simd.h"

namespace al_ext {
namespace {

constexpr int64_t kChunk = 16384;

// float32, the training path. Squares are summed in float lanes over runs of 256 elements
// and each run is added in double: float-width SIMD, with an error near double's (one
// running sum would also serialise every addition, and the loop would not vectorise).
AL_EXT_CLONE_FOR_WIDE_SIMD
double chunk_squared_error_and_grad(const float* __restrict__ input, const float* __restrict__ target,
                                    float* __restrict__ grad, int64_t n, float scale) {
  constexpr int kLanes = 16;
  constexpr int kRun = kLanes * 16;
  double total = 0.0;
  int64_t i = 0;
  for (; i + kRun <= n; i += kRun) {
    float lanes[kLanes] = {};
    for (int r = 0; r < kRun; r += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float diff = input[i + r + j] - target[i + r + j];
        lanes[j] += diff * diff;
        grad[i + r + j] = diff * scale;
      }
    }
    double run = 0.0;
    for (float lane : lanes) run += lane;
    total += run;
  }
  for (; i < n; ++i) {
    const float diff = input[i] - target[i];
    total += static_cast<double>(diff) * diff;
    grad[i] = diff * scale;
  }
  return total;
}

// float64, float16 and bfloat16: widened to double.
template <typename scalar_t>
double chunk_squared_error_and_grad(const scalar_t* input, const scalar_t* target, scalar_t* grad, int64_t n,
                                    double scale) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = static_cast<double>(input[i]) - static_cast<double>(target[i]);
    total += diff * diff;
    grad[i] = static_cast<scalar_t>(diff * scale);
  }
  return total;
}

template <typename scalar_t>
double squared_error_and_grad(const scalar_t* input, const scalar_t* target, scalar_t* grad, int64_t n) {
  using scale_t = std::conditional_t<std::is_same_v<scalar_t, float>, float, double>;
  const scale_t scale = static_cast<scale_t>(2.0 / static_cast<double>(n));
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk;
      partial[c] = chunk_squared_error_and_grad(input + begin, target + begin, grad + begin,
                                                std::min(kChunk, n - begin), scale);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cpu(const at::Tensor& input_arg,
                                                         const at::Tensor& target_arg) {
  check_loss_pair("al_ext::mse_loss_and_grad", input_arg, target_arg);
  TORCH_CHECK(input_arg.device().is_cpu(), "al_ext::mse_loss_and_grad: CPU kernel got input on ",
              input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_arg.contiguous();
  at::Tensor grad = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor loss = at::empty({}, input.options());
  const int64_t n = input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "mse_loss_and_grad_cpu", [&] {
    const double sum = squared_error_and_grad(input.const_data_ptr<scalar_t>(),
                                              target.const_data_ptr<scalar_t>(),
                                              grad.mutable_data_ptr<scalar_t>(), n);
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum / static_cast<double>(n));
  });
  return {loss, grad};
}

}  // namespace al_ext
