// A CUDA runtime for the CPU: just enough of CUDA C++ and its runtime API to compile
// al_ext's torch-free kernels (csrc/cuda/*.cu) unmodified as C++ and run them here.
// build.py first rewrites each `kernel<<<grid, block, shmem, stream>>>(args)` into
// `::cuda_on_cpu::Launch(grid, block, shmem, stream)(kernel, args)`.
//
// A launch runs its blocks one after another and each block's threads as fibers on the
// calling thread (block_runner.cpp): __syncthreads() suspends a fiber until every thread
// of the block has reached it, so it is a real barrier, and a kernel that needs one it
// lacks reads what the other threads have not written yet. `__shared__` variables are
// static, which is right because only one block runs at a time. Memory from cudaMalloc
// carries guard bytes that cudaFree checks, so a write past a buffer's end is reported.
// Streams do nothing (launches run at once, in order); there is no atomics, warp
// intrinsics, timing or true concurrency here.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
using cudaStream_t = struct CUstream_st*;

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);  // cudaErrorIllegalAddress if a guard byte was overwritten
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaDeviceSynchronize();

// The device math the kernels call unqualified, with CUDA's float overloads.
using std::exp;
using std::isfinite;
using std::log;
using std::max;
using std::min;
using std::pow;
using std::sqrt;

namespace cuda_on_cpu {

// The running thread's coordinates, switched with the fiber.
extern uint3 thread_index, block_index;
extern dim3 block_size, grid_size;

void sync_threads();
// Runs `thread_body` once per thread of the grid; the error a real launch would report.
cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr)
      : grid_(grid), block_(block), dynamic_shared_(shared_bytes) {
    (void)stream;
  }

  template <typename... Params, typename... Args> void operator()(void (*kernel)(Params...), Args&&... args) const {
    // Each thread gets its own copies of the arguments, as a kernel's parameters are.
    const std::tuple<std::decay_t<Params>...> copied(std::forward<Args>(args)...);
    run(grid_, block_, dynamic_shared_, [&] {
      std::tuple<std::decay_t<Params>...> mine = copied;
      std::apply(kernel, mine);
    });
  }

 private:
  static void run(dim3 grid, dim3 block, size_t dynamic_shared, const std::function<void()>& body);
  dim3 grid_, block_;
  size_t dynamic_shared_;
};

}  // namespace cuda_on_cpu

#define threadIdx (::cuda_on_cpu::thread_index)
#define blockIdx (::cuda_on_cpu::block_index)
#define blockDim (::cuda_on_cpu::block_size)
#define gridDim (::cuda_on_cpu::grid_size)

inline void __syncthreads() { ::cuda_on_cpu::sync_threads(); }
