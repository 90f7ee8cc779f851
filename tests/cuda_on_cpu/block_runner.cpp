// The CPU runtime behind cuda_runtime.h: runs a grid's blocks one after another, each
// block's threads as fibers (ucontext) on the calling thread, and the few runtime calls
// the kernel driver makes.
//
// Between two barriers every fiber runs as far as it can before the next one starts, in
// thread order on even phases and in reverse on odd ones (the first phase of odd-numbered
// blocks is reversed too). So a kernel that reads shared memory another thread writes
// without a __syncthreads() between them reads the stale value in one of the two orders,
// whichever thread comes first in the source.
#include <ucontext.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cuda_runtime.h"

namespace cuda_on_cpu {

uint3 thread_index{0, 0, 0}, block_index{0, 0, 0};
dim3 block_size, grid_size;

namespace {

constexpr size_t kFiberStackBytes = 64 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;

cudaError_t last_error = cudaSuccess;

void set_error(cudaError_t e) {
  if (last_error == cudaSuccess) last_error = e;
}

enum class FiberState { kRunnable, kAtBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  FiberState state = FiberState::kRunnable;
  uint3 index{0, 0, 0};
};

// One block at a time: the scheduler's context, the block's fibers, which one runs.
struct BlockScheduler {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
};
BlockScheduler block;

void fiber_entry() {
  (*block.body)();
  block.running->state = FiberState::kDone;
  swapcontext(&block.running->context, &block.scheduler);  // never resumed
}

// Runs one block's threads to the end; false if they disagreed about a barrier (some
// finished while others waited at one), which CUDA leaves undefined.
bool run_block(unsigned threads, bool reverse_first) {
  if (block.fibers.size() < threads) block.fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    if (!f.stack) f.stack.reset(new char[kFiberStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    f.state = FiberState::kRunnable;
    f.index = {t % block_size.x, (t / block_size.x) % block_size.y, t / (block_size.x * block_size.y)};
  }
  for (bool reverse = reverse_first;; reverse = !reverse) {
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& f = block.fibers[reverse ? threads - 1 - i : i];
      if (f.state == FiberState::kDone) continue;
      f.state = FiberState::kRunnable;
      thread_index = f.index;
      block.running = &f;
      swapcontext(&block.scheduler, &f.context);
    }
    unsigned done = 0;
    for (unsigned t = 0; t < threads; ++t) done += block.fibers[t].state == FiberState::kDone;
    if (done == threads) return true;
    if (done != 0) return false;
  }
}

// Guard bytes around each allocation, checked when it is freed.
constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xA5;
std::mutex allocations_mutex;
std::unordered_map<void*, size_t> allocations;  // user pointer -> size

}  // namespace

void sync_threads() {
  Fiber& f = *block.running;
  f.state = FiberState::kAtBarrier;
  swapcontext(&f.context, &block.scheduler);
}

cudaError_t run_grid(dim3 grid, dim3 threads_per_block, const std::function<void()>& thread_body) {
  const unsigned long long threads =
      static_cast<unsigned long long>(threads_per_block.x) * threads_per_block.y * threads_per_block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  grid_size = grid;
  block_size = threads_per_block;
  block.body = &thread_body;
  unsigned long long linear = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        block_index = {x, y, z};
        if (!run_block(static_cast<unsigned>(threads), linear % 2 == 1)) return cudaErrorLaunchFailure;
      }
    }
  }
  return cudaSuccess;
}

void Launch::run(dim3 grid, dim3 block_dim, size_t dynamic_shared, const std::function<void()>& body) {
  static std::mutex one_launch_at_a_time;  // the coordinates and the scheduler are global
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  // extern __shared__ arrays are not supported here; the kernels use static ones.
  set_error(dynamic_shared != 0 ? cudaErrorInvalidValue : run_grid(grid, block_dim, body));
}

}  // namespace cuda_on_cpu

using cuda_on_cpu::allocations;
using cuda_on_cpu::allocations_mutex;
using cuda_on_cpu::kGuardByte;
using cuda_on_cpu::kGuardBytes;

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_on_cpu::last_error;
  cuda_on_cpu::last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered (a guard byte was overwritten)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (threads of a block disagreed about a barrier)";
  }
  return "unknown error";
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  auto* raw = static_cast<unsigned char*>(std::malloc(bytes + 2 * kGuardBytes));
  if (raw == nullptr) return cudaErrorMemoryAllocation;
  std::memset(raw, kGuardByte, kGuardBytes);
  std::memset(raw + kGuardBytes + bytes, kGuardByte, kGuardBytes);
  *ptr = raw + kGuardBytes;
  const std::lock_guard<std::mutex> lock(allocations_mutex);
  allocations[*ptr] = bytes;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  size_t bytes;
  {
    const std::lock_guard<std::mutex> lock(allocations_mutex);
    auto it = allocations.find(ptr);
    if (it == allocations.end()) return cudaErrorInvalidValue;
    bytes = it->second;
    allocations.erase(it);
  }
  auto* raw = static_cast<unsigned char*>(ptr) - kGuardBytes;
  bool intact = true;
  for (size_t i = 0; i < kGuardBytes; ++i) {
    intact = intact && raw[i] == kGuardByte && raw[kGuardBytes + bytes + i] == kGuardByte;
  }
  std::free(raw);
  return intact ? cudaSuccess : cudaErrorIllegalAddress;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
