// Block steps the executor can run without Python: a fused dense block with its optimiser
// state, through the dispatcher (so on whichever device the tensors live).
#pragma once

#include <string>
#include <vector>

#include "executor.h"

namespace al_ext::scheduler {

struct DenseBlockSpec {
  std::vector<at::Tensor> params;  // W_f, c_f, W_b1, c_b1, W_b2, c_b2, W_g, c_g, W_h, c_h
  std::string x_activation, h_activation, variant, ae_loss;
  double lr_fb = 0.0, lr_gh = 0.0;
};

// al_ext::dense_block_adam_step_; `steps` are the parameters' step counters, all advanced
// by one after each successful step (torch.optim.Adam's state layout). With `step_count`
// (a one-element tensor on the parameters' device, equal to the counters) the step number
// lives there instead: the op (its step_tensor form) reads and advances it on the device,
// so that a CUDA graph can replay the step, and `steps` are left for the caller to set from
// it after the run.
BlockStep fused_adam_block_step(DenseBlockSpec spec, std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq,
                           std::vector<at::Tensor> steps, double beta1, double beta2, double eps,
                           at::Tensor step_count = {});

// al_ext::dense_block_sgd_step_.
BlockStep fused_sgd_block_step(DenseBlockSpec spec, std::vector<at::Tensor> momentum_buffer, double momentum);

#ifdef AL_EXT_WITH_CUDA
// `step` replayed from a CUDA graph after its first call (cuda_graph_step.cpp says what the
// step must allow). Each call must come from the same thread and on the same stream.
BlockStep cuda_graph_block_step(BlockStep step);
#endif

}  // namespace al_ext::scheduler
