// CUDA kernels of the dense block step between its GEMMs. Reductions use a fixed grid and a
// fixed tree order (no atomics), so results repeat bit for bit. float16 and bfloat16 compute
// in float, float64 in double. compute_dtype=bfloat16 (float32 master weights) runs the loss
// and activation kernels on bfloat16 activations with float32 losses, and the update in
// float32, writing the bfloat16 copies of the weights as it goes.
#include <algorithm>
#include <cmath>

#include "block_reduce.cuh"
#include "dense_block.cuh"

namespace al_ext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;
constexpr int kItemsPerThread = 4;

template <typename A> __device__ __forceinline__ A activation_slope(ActivationKind a, A y) {
  switch (a) {
    case ActivationKind::kElu: return y > A(0) ? A(1) : y + A(1);
    case ActivationKind::kRelu: return y > A(0) ? A(1) : A(0);
    case ActivationKind::kSigmoid: return y * (A(1) - y);
    case ActivationKind::kTanh: return A(1) - y * y;
    case ActivationKind::kIdentity: return A(1);
  }
  return A(1);
}

template <typename T>
__global__ void output_mse_kernel(const T* __restrict__ out, const T* __restrict__ target, T* __restrict__ dz,
                                  T* __restrict__ dtarget, double* __restrict__ partial, int64_t n,
                                  ActivationKind act) {
  using A = typename Accumulator<T>::type;
  const A scale = A(2) / static_cast<A>(n);
  A sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A o = widen(out[i]);
    const A diff = o - widen(target[i]);
    sum += diff * diff;
    dz[i] = narrow<T>(diff * scale * activation_slope(act, o));
    if (dtarget != nullptr) dtarget[i] = narrow<T>(-diff * scale);
  }
  const A total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<double>(total);
}

// One block per row: the row's log-sum-exp, loss and gradient.
template <typename T>
__global__ void cross_entropy_kernel(const T* __restrict__ logits, const T* __restrict__ target, T* __restrict__ dz,
                                     double* __restrict__ partial, int64_t rows, int64_t cols) {
  using A = typename Accumulator<T>::type;
  const int64_t r = blockIdx.x;
  const T* l = logits + r * cols;
  const T* p = target + r * cols;
  A top = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) top = max(top, widen(l[j]));
  __shared__ A shared_top[kThreads];
  shared_top[threadIdx.x] = top;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared_top[threadIdx.x] = max(shared_top[threadIdx.x], shared_top[threadIdx.x + stride]);
    __syncthreads();
  }
  top = shared_top[0];
  A denom = 0, mass = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    denom += exp(widen(l[j]) - top);
    mass += widen(p[j]);
  }
  denom = block_sum<kThreads>(denom);
  mass = block_sum<kThreads>(mass);
  const A log_denom = log(denom);
  A loss = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const A shifted = widen(l[j]) - top - log_denom;
    loss -= widen(p[j]) * shifted;
    dz[r * cols + j] = narrow<T>((exp(shifted) * mass - widen(p[j])) / static_cast<A>(rows));
  }
  loss = block_sum<kThreads>(loss);
  if (threadIdx.x == 0) partial[r] = static_cast<double>(loss);
}

// loss = sum(partial) / divisor, by one block in a fixed order.
template <typename T>
__global__ void mean_of_partials_kernel(const double* __restrict__ partial, int64_t count, double divisor,
                                        T* __restrict__ loss) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *loss = narrow<T>(total / divisor);
}

template <typename T>
__global__ void activation_backward_kernel(T* __restrict__ grad, const T* __restrict__ y,
                                           const T* __restrict__ addend, int64_t n, ActivationKind act) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    auto g = widen(grad[i]);
    if (addend != nullptr) g += widen(addend[i]);
    grad[i] = narrow<T>(g * activation_slope(act, widen(y[i])));
  }
}

template <typename T> __device__ __forceinline__ bool guard_losses_finite(const void* loss_as, const void* loss_ae) {
  if (loss_as == nullptr || loss_ae == nullptr) return true;
  return isfinite(widen(*static_cast<const T*>(loss_as))) && isfinite(widen(*static_cast<const T*>(loss_ae)));
}

__device__ __forceinline__ double read_step_count(const void* count, bool is_double) {
  return is_double ? *static_cast<const double*>(count) : static_cast<double>(*static_cast<const float*>(count));
}

// torch's lerp (ATen's formula): exp_avg.lerp_(grad, 1 - beta1) in torch.optim.Adam.
template <typename A> __device__ __forceinline__ A lerp(A from, A to, A weight) {
  return weight < A(0.5) ? from + weight * (to - from) : to - (to - from) * (A(1) - weight);
}

// param[i] <- w, and its bfloat16 copy, if kept, <- the stored value rounded: the copy is
// what param.to(torch.bfloat16) would give.
template <typename T, typename A>
__device__ __forceinline__ void store_param(T* param, __nv_bfloat16* copy, int64_t i, A w) {
  const T stored = narrow<T>(w);
  param[i] = stored;
  if (copy != nullptr) copy[i] = narrow<__nv_bfloat16>(widen(stored));
}

// blockIdx.y picks the tensor; the blocks of a row stride over its elements. Each
// coefficient is formed in double and rounded once to the compute type, as torch.optim
// rounds its Python floats: `1 - beta2` formed in float differs from torch's by 1.3e-5.
template <typename T> __global__ void multi_tensor_update_kernel(MultiTensorUpdateParams p) {
  if (static_cast<int>(blockIdx.y) >= p.count) return;
  if (!guard_losses_finite<T>(p.loss_as, p.loss_ae)) return;  // a refused step changes nothing
  const UpdateTensor& u = p.tensors[blockIdx.y];
  T* param = static_cast<T*>(u.param);
  const T* grad = static_cast<const T*>(u.grad);
  T* s1 = static_cast<T*>(u.state1);
  T* s2 = static_cast<T*>(u.state2);
  __nv_bfloat16* copy = static_cast<__nv_bfloat16*>(u.compute_copy);
  using A = typename Accumulator<T>::type;  // float, or double for float64 (as torch.optim's)
  const double lr = p.lr[u.group];
  const A l2 = static_cast<A>(p.decoupled_weight_decay ? 0.0 : p.weight_decay);
  const A decay = static_cast<A>(p.decoupled_weight_decay ? 1.0 - lr * p.weight_decay : 1.0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p.kind == UpdateKind::kAdam) {
    const double step = p.step_count != nullptr ? read_step_count(p.step_count, p.step_count_is_double) + 1.0 : p.step;
    const A one_minus_beta1 = static_cast<A>(1.0 - p.beta1), beta2 = static_cast<A>(p.beta2);
    const A one_minus_beta2 = static_cast<A>(1.0 - p.beta2), eps = static_cast<A>(p.eps);
    const A step_size = static_cast<A>(lr / (1.0 - pow(p.beta1, step)));
    const A bias_correction2_sqrt = static_cast<A>(sqrt(1.0 - pow(p.beta2, step)));
    for (int64_t i = first; i < u.n; i += stride) {
      A w = widen(param[i]);
      const A g = widen(grad[i]) + l2 * w;
      w *= decay;
      const A m = lerp(widen(s1[i]), g, one_minus_beta1);
      const A v = widen(s2[i]) * beta2 + one_minus_beta2 * g * g;
      w += -step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps));
      s1[i] = narrow<T>(m);
      s2[i] = narrow<T>(v);
      store_param(param, copy, i, w);
    }
  } else {
    const A momentum = static_cast<A>(p.momentum), lr_a = static_cast<A>(lr);
    for (int64_t i = first; i < u.n; i += stride) {
      A w = widen(param[i]);
      const A buf = momentum * widen(s1[i]) + (widen(grad[i]) + l2 * w);
      w += -lr_a * buf;
      s1[i] = narrow<T>(buf);
      store_param(param, copy, i, w);
    }
  }
}

// One thread, after the update kernel: counts the step if that kernel took it.
template <typename T> __global__ void advance_step_count_kernel(MultiTensorUpdateParams p) {
  if (!guard_losses_finite<T>(p.loss_as, p.loss_ae)) return;
  if (p.step_count_is_double) {
    *static_cast<double*>(p.step_count) += 1.0;
  } else {
    *static_cast<float*>(p.step_count) += 1.0f;
  }
}

int grid_for(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kItemsPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + per_block - 1) / per_block)));
}

// The loss from a kernel's partial sums: in T, the elements' type, or in float32.
template <typename T>
cudaError_t launch_mean_of_partials(const double* partial, int64_t count, double divisor, void* loss,
                                    bool float32_loss, cudaStream_t stream) {
  if (float32_loss) {
    mean_of_partials_kernel<float><<<1, kThreads, 0, stream>>>(partial, count, divisor, static_cast<float*>(loss));
  } else {
    mean_of_partials_kernel<T><<<1, kThreads, 0, stream>>>(partial, count, divisor, static_cast<T*>(loss));
  }
  return cudaGetLastError();
}

template <typename T> struct OutputMseLaunch {
  static cudaError_t run(const OutputMseParams& p, cudaStream_t stream) {
    const int blocks = grid_for(p.n);
    output_mse_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(p.out), static_cast<const T*>(p.target), static_cast<T*>(p.dz),
        static_cast<T*>(p.dtarget), p.partial, p.n, p.act);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return launch_mean_of_partials<T>(p.partial, blocks, static_cast<double>(p.n), p.loss, p.float32_loss, stream);
  }
};

template <typename T> struct CrossEntropyLaunch {
  static cudaError_t run(const CrossEntropyParams& p, cudaStream_t stream) {
    cross_entropy_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
        static_cast<const T*>(p.logits), static_cast<const T*>(p.target), static_cast<T*>(p.dz), p.partial, p.rows,
        p.cols);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return launch_mean_of_partials<T>(p.partial, p.rows, static_cast<double>(p.rows), p.loss, p.float32_loss,
                                      stream);
  }
};

template <typename T> struct ActivationBackwardLaunch {
  static cudaError_t run(const ActivationBackwardParams& p, cudaStream_t stream) {
    activation_backward_kernel<T><<<grid_for(p.n), kThreads, 0, stream>>>(
        static_cast<T*>(p.grad), static_cast<const T*>(p.y), static_cast<const T*>(p.addend), p.n, p.act);
    return cudaGetLastError();
  }
};

template <typename T> struct MultiTensorUpdateLaunch {
  static cudaError_t run(const MultiTensorUpdateParams& p, cudaStream_t stream) {
    int64_t largest = 0;
    for (int i = 0; i < p.count; ++i) largest = std::max(largest, p.tensors[i].n);
    multi_tensor_update_kernel<T><<<dim3(grid_for(largest), p.count), kThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.step_count == nullptr) return err;
    advance_step_count_kernel<T><<<1, 1, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace

int reduction_blocks(int64_t n) { return grid_for(n); }

cudaError_t launch_output_mse_backward(const OutputMseParams& p, cudaStream_t stream) {
  return dispatch_float_type<OutputMseLaunch>(p.type, p, stream);
}

cudaError_t launch_cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  return dispatch_float_type<CrossEntropyLaunch>(p.type, p, stream);
}

cudaError_t launch_activation_backward(const ActivationBackwardParams& p, cudaStream_t stream) {
  return dispatch_float_type<ActivationBackwardLaunch>(p.type, p, stream);
}

cudaError_t launch_multi_tensor_update(const MultiTensorUpdateParams& p, cudaStream_t stream) {
  if (p.count < 1 || p.count > kMaxUpdateTensors) return cudaErrorInvalidValue;
  return dispatch_float_type<MultiTensorUpdateLaunch>(p.type, p, stream);
}

}  // namespace al_ext::cuda
