// A torch-free driver of the kernels' launchers (csrc/cuda/dense_block.cuh): each entry
// point takes host buffers, copies them to the device, launches on the default stream and
// copies the results back. Written against the CUDA runtime API, so that it builds both
// with nvcc for a GPU (scripts/gpu_check.sh runs it under compute-sanitizer through
// sanitize_kernels.cpp) and with a plain C++ compiler over this folder's CPU runtime
// (tests/test_cuda_kernels_on_cpu.py calls it through ctypes).
//
// Outputs and scratch start as all-ones bytes (NaN in every float type), so an element a
// kernel fails to write shows. Each entry point returns the first CUDA error (0: none).
#include "kernel_driver.h"

#include <cuda_runtime.h>

#include <utility>
#include <vector>

#include "dense_block.cuh"

namespace {

using namespace al_ext::cuda;

size_t element_bytes(int type) {
  switch (static_cast<FloatType>(type)) {
    case FloatType::kFloat32: return 4;
    case FloatType::kFloat64: return 8;
    case FloatType::kFloat16:
    case FloatType::kBFloat16: return 2;
  }
  return 0;
}

// The device buffers of one call, and which of them go back to the host.
class Buffers {
 public:
  ~Buffers() {
    for (void* d : device_) record(cudaFree(d));
  }

  // A copy of a host input; null stays null.
  void* input(const void* host, size_t bytes) {
    if (host == nullptr) return nullptr;
    void* d = allocate(bytes);
    if (d != nullptr) record(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    return d;
  }
  // An input the kernel updates: copied back at finish().
  void* in_out(void* host, size_t bytes) {
    void* d = input(host, bytes);
    if (d != nullptr) back_.push_back({host, d, bytes});
    return d;
  }
  // An output: NaN until the kernel writes it, copied back at finish(); null stays null.
  void* output(void* host, size_t bytes) {
    if (host == nullptr) return nullptr;
    void* d = scratch(bytes);
    if (d != nullptr) back_.push_back({host, d, bytes});
    return d;
  }
  void* scratch(size_t bytes) {
    void* d = allocate(bytes);
    if (d != nullptr) record(cudaMemset(d, 0xff, bytes));
    return d;
  }

  int finish(cudaError_t launch) {
    record(launch);
    record(cudaDeviceSynchronize());
    for (const Back& b : back_) record(cudaMemcpy(b.host, b.device, b.bytes, cudaMemcpyDeviceToHost));
    for (void* d : device_) record(cudaFree(d));  // on the CPU runtime: checks the guard bytes
    device_.clear();
    return static_cast<int>(error_);
  }

 private:
  struct Back {
    void* host;
    void* device;
    size_t bytes;
  };

  void* allocate(size_t bytes) {
    void* d = nullptr;
    record(cudaMalloc(&d, bytes == 0 ? 1 : bytes));
    if (d != nullptr) device_.push_back(d);
    return d;
  }
  void record(cudaError_t e) {
    if (error_ == cudaSuccess) error_ = e;
  }

  std::vector<void*> device_;
  std::vector<Back> back_;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace

extern "C" {

int driver_reduction_blocks(int64_t n) { return reduction_blocks(n); }

int driver_output_mse(int type, const void* out, const void* target, void* dz, void* dtarget, void* loss, int64_t n,
                      int activation, int float32_loss) {
  const size_t bytes = static_cast<size_t>(n) * element_bytes(type);
  Buffers b;
  OutputMseParams p;
  p.out = b.input(out, bytes);
  p.target = b.input(target, bytes);
  p.dz = b.output(dz, bytes);
  p.dtarget = b.output(dtarget, bytes);
  p.loss = b.output(loss, float32_loss ? sizeof(float) : element_bytes(type));
  p.partial = static_cast<double*>(b.scratch(sizeof(double) * reduction_blocks(n)));
  p.n = n;
  p.act = static_cast<ActivationKind>(activation);
  p.type = static_cast<FloatType>(type);
  p.float32_loss = float32_loss != 0;
  return b.finish(launch_output_mse_backward(p, nullptr));
}

int driver_cross_entropy(int type, const void* logits, const void* target, void* dz, void* loss, int64_t rows,
                         int64_t cols, int float32_loss) {
  const size_t bytes = static_cast<size_t>(rows * cols) * element_bytes(type);
  Buffers b;
  CrossEntropyParams p;
  p.logits = b.input(logits, bytes);
  p.target = b.input(target, bytes);
  p.dz = b.output(dz, bytes);
  p.loss = b.output(loss, float32_loss ? sizeof(float) : element_bytes(type));
  p.partial = static_cast<double*>(b.scratch(sizeof(double) * rows));
  p.rows = rows;
  p.cols = cols;
  p.type = static_cast<FloatType>(type);
  p.float32_loss = float32_loss != 0;
  return b.finish(launch_cross_entropy_backward(p, nullptr));
}

int driver_activation_backward(int type, void* grad, const void* y, const void* addend, int64_t n, int activation) {
  const size_t bytes = static_cast<size_t>(n) * element_bytes(type);
  Buffers b;
  ActivationBackwardParams p;
  p.grad = b.in_out(grad, bytes);
  p.y = b.input(y, bytes);
  p.addend = b.input(addend, bytes);
  p.n = n;
  p.act = static_cast<ActivationKind>(activation);
  p.type = static_cast<FloatType>(type);
  return b.finish(launch_activation_backward(p, nullptr));
}

int driver_multi_tensor_update(const DriverUpdate* u) {
  Buffers b;
  MultiTensorUpdateParams p;
  p.count = u->count;
  p.kind = static_cast<UpdateKind>(u->kind);
  p.beta1 = u->beta1;
  p.beta2 = u->beta2;
  p.eps = u->eps;
  p.momentum = u->momentum;
  p.weight_decay = u->weight_decay;
  p.decoupled_weight_decay = u->decoupled_weight_decay != 0;
  p.lr[0] = u->lr[0];
  p.lr[1] = u->lr[1];
  p.step = u->step;
  p.type = static_cast<FloatType>(u->type);
  const size_t element = element_bytes(u->type);
  for (int i = 0; i < u->count && i < kMaxUpdateTensors; ++i) {
    const size_t bytes = static_cast<size_t>(u->n[i]) * element;
    p.tensors[i] = {b.in_out(u->param[i], bytes), b.input(u->grad[i], bytes), b.in_out(u->state1[i], bytes),
                    b.in_out(u->state2[i], bytes), u->n[i], u->group[i],
                    b.in_out(u->compute_copy[i], static_cast<size_t>(u->n[i]) * 2)};  // bfloat16
  }
  p.loss_as = b.input(u->loss_as, element);
  p.loss_ae = b.input(u->loss_ae, element);
  p.step_count = b.in_out(u->step_count, u->step_count_is_double ? sizeof(double) : sizeof(float));
  p.step_count_is_double = u->step_count_is_double != 0;
  return b.finish(launch_multi_tensor_update(p, nullptr));
}

}  // extern "C"
