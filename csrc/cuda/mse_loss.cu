// CUDA kernels of al_ext::mse_loss_and_grad. Pass 1: each block sums the squared error
// of a grid-strided share of the elements and writes the gradient as it goes. Pass 2:
// one block adds the per-block sums in a fixed order. No atomics, so runs repeat bit
// for bit. Half and bfloat16 inputs accumulate in float, float64 in double.
#include <algorithm>

#include "block_reduce.cuh"
#include "mse_loss.cuh"

namespace al_ext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;
constexpr int kItemsPerThread = 4;

template <typename T>
__global__ void squared_error_and_grad_kernel(const T* __restrict__ input, const T* __restrict__ target,
                                              T* __restrict__ grad, double* __restrict__ partial,
                                              int64_t n) {
  using A = typename Accumulator<T>::type;
  const A scale = A(2) / static_cast<A>(n);
  A sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A diff = widen(input[i]) - widen(target[i]);
    sum += diff * diff;
    grad[i] = narrow<T>(diff * scale);
  }
  const A block_total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<double>(block_total);
}

template <typename T>
__global__ void mean_of_partials_kernel(const double* __restrict__ partial, int count, T* __restrict__ loss,
                                        int64_t n) {
  double sum = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *loss = narrow<T>(total / static_cast<double>(n));
}

template <typename T> struct MseLossLaunch {
  static cudaError_t run(const MseLossParams& p, cudaStream_t stream);
};

template <typename T> cudaError_t MseLossLaunch<T>::run(const MseLossParams& p, cudaStream_t stream) {
  const int blocks = mse_loss_partial_count(p.n);
  squared_error_and_grad_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(p.input), static_cast<const T*>(p.target), static_cast<T*>(p.grad), p.partial,
      p.n);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mean_of_partials_kernel<T><<<1, kThreads, 0, stream>>>(p.partial, blocks, static_cast<T*>(p.loss), p.n);
  return cudaGetLastError();
}

}  // namespace

int mse_loss_partial_count(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kItemsPerThread;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + per_block - 1) / per_block)));
}

cudaError_t launch_mse_loss_and_grad(const MseLossParams& params, cudaStream_t stream) {
  return dispatch_float_type<MseLossLaunch>(params.type, params, stream);
}

}  // namespace al_ext::cuda
