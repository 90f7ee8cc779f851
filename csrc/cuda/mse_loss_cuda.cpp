// CUDA glue of al_ext::mse_loss_and_grad: checks the arguments once and launches, on the
// current stream, the dense block's output-MSE kernel (dense_block.cu) with an identity
// output: the same loss and gradient, and the same deterministic reduction.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops/checks.h"
#include "../ops/ops.h"
#include "glue.h"
#include "dense_block.cuh"

namespace al_ext {

std::tuple<at::Tensor, at::Tensor> mse_loss_and_grad_cuda(const at::Tensor& input_arg,
                                                          const at::Tensor& target_arg) {
  check_loss_pair("al_ext::mse_loss_and_grad", input_arg, target_arg);
  TORCH_CHECK(input_arg.is_cuda(), "al_ext::mse_loss_and_grad: CUDA kernel got input on ", input_arg.device());
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor target = target_arg.contiguous();
  at::Tensor grad = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor loss = at::empty({}, input.options());
  const int64_t n = input.numel();
  at::Tensor partial = at::empty({cuda::reduction_blocks(n)}, input.options().dtype(at::kDouble));

  cuda::OutputMseParams params;
  params.out = input.const_data_ptr();
  params.target = target.const_data_ptr();
  params.dz = grad.mutable_data_ptr();
  params.loss = loss.mutable_data_ptr();
  params.partial = partial.mutable_data_ptr<double>();
  params.n = n;
  params.act = cuda::ActivationKind::kIdentity;
  params.type = to_float_type(input.scalar_type(), "al_ext::mse_loss_and_grad");
  check_launch(cuda::launch_output_mse_backward(params, c10::cuda::getCurrentCUDAStream()),
               "al_ext::mse_loss_and_grad", "the MSE kernel");
  return {loss, grad};
}

}  // namespace al_ext
