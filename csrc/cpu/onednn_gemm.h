// The dense block's float32 GEMMs on the CPU through oneDNN, which libtorch_cpu ships and
// exposes as the operator mkldnn::_linear_pointwise (what torch.compile's CPU backend calls
// for a Linear). On the project's 2-core AMD EPYC machines MKL's sgemm gains little from
// the second thread on a thin GEMM (batch 32-128 rows), and oneDNN's was 1.3-1.7x faster
// at the NECO MLP's shapes (benchmarks/RESULTS.md). Single-threaded the two are alike, so
// the weight-gradient tiles, each computed by one thread, stay with at::mm.
#pragma once

#include <ATen/core/Tensor.h>

#include "../ops/dense_block.h"

namespace al_ext {

// act(x w^T + bias) for 2-D x (N, in), w (out, in), bias (out) or undefined. ReLU, sigmoid
// and tanh ride in the GEMM as oneDNN post-ops; ELU is applied after it. Uses oneDNN for
// float32 and bfloat16 (bfloat16 operands, float32 accumulation, bfloat16 result) where torch
// has it, linear_forward (ATen) otherwise. Any strides.
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, Activation act);

// "onednn" where the float32 GEMMs above go through oneDNN, "aten" where torch has no oneDNN.
const char* cpu_gemm_library();

// Whether this CPU multiplies bfloat16 matrices in hardware (AVX512_BF16 or AMX, as cpuinfo
// reports) and torch has oneDNN to do it: where not, bf16 GEMMs are emulated, slower than
// float32, and the fused step refuses compute_dtype=bfloat16.
bool cpu_has_bf16_gemm();

// a b for 2-D a (N, K) and b (K, M): cpu_linear(a, b^T) with no bias.
inline at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b) {
  return cpu_linear(a, b.t(), at::Tensor(), Activation::kIdentity);
}

}  // namespace al_ext
