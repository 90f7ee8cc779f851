// Every al_ext op schema, and which kernel serves it on which device. Python reaches
// them as torch.ops.al_ext.<name>; fake (meta) kernels and autograd formulas are
// registered in al_ext/ops.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(al_ext, m) {
  m.def("mse_loss_and_grad(Tensor input, Tensor target) -> (Tensor loss, Tensor grad_input)");
}

TORCH_LIBRARY_IMPL(al_ext, CPU, m) {
  m.impl("mse_loss_and_grad", &al_ext::mse_loss_and_grad_cpu);
}

#ifdef AL_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(al_ext, CUDA, m) {
  m.impl("mse_loss_and_grad", &al_ext::mse_loss_and_grad_cuda);
}
#endif
