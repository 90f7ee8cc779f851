// Block steps the executor can run without Python: a fused dense block with its optimiser
// state, through the dispatcher (so on whichever device the tensors live).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "executor.h"

namespace al_ext::scheduler {

// The learning rates (lr_fb, lr_gh) for a block's next step, asked for after each step it
// takes: a learning-rate schedule stepped by the worker running the block, so that block i
// trains on batch j with the rates that the sequential loop gives it on batch j. Runs on that
// worker's thread.
using NextLearningRates = std::function<std::pair<double, double>()>;

struct DenseBlockSpec {
  std::vector<at::Tensor> params;  // W_f, c_f, W_b1, c_b1, W_b2, c_b2, W_g, c_g, W_h, c_h
  std::string x_activation, h_activation, variant, ae_loss;
  double lr_fb = 0.0, lr_gh = 0.0;
  double weight_decay = 0.0;
  NextLearningRates next_lrs;  // optional: the rates stay as they are without it
  std::optional<at::ScalarType> compute_dtype;  // the op's compute_dtype (None: the parameters' dtype)
  std::vector<at::Tensor> compute_weights;      // the op's compute_weights (none if empty)
};

// al_ext::dense_block_adam_step_; `steps` are the parameters' step counters, all advanced
// by one after each step taken (torch.optim.Adam's state layout). With `step_count`
// (a one-element tensor on the parameters' device, equal to the counters) the step number
// lives there instead: the op (its step_tensor form) reads and advances it on the device,
// so that a CUDA graph can replay the step, and `steps` are left for the caller to set from
// it after the run.
BlockStep fused_adam_block_step(DenseBlockSpec spec, std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq,
                                std::vector<at::Tensor> steps, double beta1, double beta2, double eps,
                                bool decoupled_weight_decay, at::Tensor step_count = {});

// al_ext::dense_block_sgd_step_.
BlockStep fused_sgd_block_step(DenseBlockSpec spec, std::vector<at::Tensor> momentum_buffer, double momentum);

#ifdef AL_EXT_WITH_CUDA
// `step` replayed from a CUDA graph after its first call (cuda_graph_step.cpp says what the
// step must allow). Each call must come from the same thread and on the same stream. A
// replay's outputs are the graph's static buffers (StepResult::outputs_reused).
BlockStep cuda_graph_block_step(BlockStep step);
#endif

}  // namespace al_ext::scheduler
