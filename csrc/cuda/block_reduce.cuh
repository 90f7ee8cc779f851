// A deterministic sum over a thread block: a fixed tree order, so that runs repeat bit
// for bit (no atomics). No torch headers.
#pragma once

namespace al_ext::cuda {

// Sum of `value` over a block of kThreads threads (a power of two); valid in thread 0.
template <int kThreads, typename A> __device__ A block_sum(A value) {
  __shared__ A shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const A total = shared[0];
  __syncthreads();  // the buffer may be reused by the caller's next block_sum
  return total;
}

}  // namespace al_ext::cuda
