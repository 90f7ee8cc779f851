// Runs every launcher of csrc/cuda/dense_block.cuh, through kernel_driver.cpp, in all four
// float types over the shapes of tests/test_cuda_kernels_on_cpu.py, on random data: a
// program without torch for compute-sanitizer (scripts/gpu_check.sh), whose tools would
// take minutes over a process that loads torch. It checks no values (the CPU test does,
// and the CUDA tests on a GPU): it fails on a launch error, or when the sanitizer reports.
//
//     sanitize_kernels [largest element count, default 1052673: past one grid]
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernel_driver.h"

namespace {

const char* const kTypeNames[] = {"float32", "float64", "float16", "bfloat16"};
const size_t kTypeBytes[] = {4, 8, 2, 2};

// n random values in [low, high) as `type`'s bytes.
std::vector<unsigned char> random_values(int type, int64_t n, float low, float high, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(low, high);
  std::vector<unsigned char> out(static_cast<size_t>(n) * kTypeBytes[type] + 1);
  for (int64_t i = 0; i < n; ++i) {
    const float v = dist(gen);
    unsigned char* at = out.data() + i * kTypeBytes[type];
    if (type == 0) std::memcpy(at, &v, 4);
    if (type == 1) { const double d = v; std::memcpy(at, &d, 8); }
    if (type == 2) { const __half h = __float2half(v); std::memcpy(at, &h, 2); }
    if (type == 3) { const __nv_bfloat16 h = __float2bfloat16(v); std::memcpy(at, &h, 2); }
  }
  return out;
}

int failures = 0;

void expect(int error, const char* what, int type, long long size) {
  if (error == 0) return;
  ++failures;
  std::printf("FAILED: %s, %s, size %lld: CUDA error %d\n", what, kTypeNames[type], size, error);
}

void run_update(int type, int kind, const std::vector<int64_t>& sizes) {
  std::vector<std::vector<unsigned char>> buffers;
  DriverUpdate u{};
  u.type = type;
  u.kind = kind;
  u.count = static_cast<int>(sizes.size());
  for (int i = 0; i < u.count; ++i) {
    buffers.push_back(random_values(type, sizes[i], -1, 1, 10 + i));
    u.param[i] = buffers.back().data();
    buffers.push_back(random_values(type, sizes[i], -0.1f, 0.1f, 20 + i));
    u.grad[i] = buffers.back().data();
    buffers.push_back(random_values(type, sizes[i], -0.01f, 0.01f, 30 + i));
    u.state1[i] = buffers.back().data();
    buffers.push_back(random_values(type, sizes[i], 0, 1e-4f, 40 + i));
    u.state2[i] = kind == 0 ? buffers.back().data() : nullptr;
    u.n[i] = sizes[i];
    u.group[i] = i % 2;
    if (type == 0) {  // float32 parameters: their bfloat16 copies too, as compute_dtype=bfloat16 keeps them
      buffers.push_back(random_values(3, sizes[i], -1, 1, 60 + i));
      u.compute_copy[i] = buffers.back().data();
    }
  }
  u.beta1 = 0.9;
  u.beta2 = 0.999;
  u.eps = 1e-8;
  u.momentum = 0.9;
  u.weight_decay = 0.01;
  u.decoupled_weight_decay = kind == 0;
  u.lr[0] = 1e-3;
  u.lr[1] = 2e-3;
  u.step = 1;
  const std::vector<unsigned char> loss_as = random_values(type, 1, 0, 1, 50), loss_ae = random_values(type, 1, 0, 1, 51);
  u.loss_as = loss_as.data();
  u.loss_ae = loss_ae.data();
  float count = 3;
  u.step_count = kind == 0 ? &count : nullptr;
  expect(driver_multi_tensor_update(&u), kind == 0 ? "multi-tensor update (AdamW)" : "multi-tensor update (SGD)", type,
         sizes.front());
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t largest = argc > 1 ? std::atoll(argv[1]) : 1024 * 256 * 4 + 4097;
  const std::vector<int64_t> counts = {1, 7, 300, 40000, largest};
  const int64_t ce_shapes[][2] = {{1, 1}, {1, 10}, {17, 5}, {64, 13}, {3, 1000}};
  for (int type = 0; type < 4; ++type) {
    for (int64_t n : counts) {
      const auto a = random_values(type, n, 0, 1, 1), b = random_values(type, n, 0, 1, 2);
      std::vector<unsigned char> c(a.size()), d(a.size()), loss(8);
      for (int act = 0; act < 5; ++act) {
        // The float32 loss of bf16 compute, on every other activation.
        expect(driver_output_mse(type, a.data(), b.data(), c.data(), act % 2 ? d.data() : nullptr, loss.data(), n, act,
                                 act % 2),
               "output MSE backward", type, n);
        c = random_values(type, n, -1, 1, 3);
        expect(driver_activation_backward(type, c.data(), a.data(), act % 2 ? b.data() : nullptr, n, act),
               "activation backward", type, n);
      }
    }
    for (const auto& shape : ce_shapes) {
      const int64_t n = shape[0] * shape[1];
      const auto logits = random_values(type, n, -4, 4, 4), target = random_values(type, n, 0, 1, 5);
      std::vector<unsigned char> dz(logits.size()), loss(8);
      expect(driver_cross_entropy(type, logits.data(), target.data(), dz.data(), loss.data(), shape[0], shape[1],
                                  shape[0] % 2),
             "cross-entropy backward", type, n);
    }
    run_update(type, 0, {largest, 1, 7, 1025});
    run_update(type, 1, {1025, 7, 1, largest});
  }
  std::printf("%s: every launcher in 4 float types, up to %lld elements\n", failures ? "FAILED" : "ok",
              static_cast<long long>(largest));
  return failures ? 1 : 0;
}
