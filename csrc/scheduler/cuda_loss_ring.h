// Where a CUDA stage keeps its steps' losses until the host reads them (built with CUDA only):
// each step's (L_as, L_ae) is copied into a slot of a device buffer behind the step, and a
// batch's slots go to pinned host memory in one copy behind the batch's last step. No
// allocation, no stacking and no host copy per step: a small step's host time is the
// pipeline's bound.
#pragma once

#ifdef AL_EXT_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>
#include <vector>

namespace al_ext::scheduler {

class LossRing {
 public:
  static constexpr int64_t kSlots = 1024;

  explicit LossRing(c10::Device device)
      : device_(at::empty({kSlots, 2}, at::TensorOptions().dtype(at::kDouble).device(device))),
        host_(at::empty({kSlots, 2}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true))) {
    for (int64_t i = 0; i < kSlots; ++i) slot_views_.emplace_back(device_[i][0], device_[i][1]);
  }

  // The slot of step number `step` (steps count up from 0 over the run).
  static int64_t slot(int64_t step) { return step % kSlots; }

  // On the current stream, behind the step: its losses into its slot (converted to double).
  void write(int64_t step, const at::Tensor& loss_as, const at::Tensor& loss_ae) {
    auto& [as, ae] = slot_views_[slot(step)];
    as.copy_(loss_as.reshape({}), /*non_blocking=*/true);
    ae.copy_(loss_ae.reshape({}), /*non_blocking=*/true);
  }

  // Steps [first, end) (fewer than kSlots) to the host, on `stream`, behind what it runs.
  void copy_to_host(int64_t first, int64_t end, const c10::cuda::CUDAStream& stream) {
    while (first < end) {
      const int64_t from = slot(first), count = std::min(end - first, kSlots - from);  // up to the wrap
      C10_CUDA_CHECK(cudaMemcpyAsync(host_.mutable_data_ptr<double>() + 2 * from,
                                     device_.const_data_ptr<double>() + 2 * from, sizeof(double) * 2 * count,
                                     cudaMemcpyDeviceToHost, stream.stream()));
      first += count;
    }
  }

  // Valid once the copy that carried the step has completed.
  std::pair<double, double> read(int64_t step) const {
    const double* row = host_.const_data_ptr<double>() + 2 * slot(step);
    return {row[0], row[1]};
  }

 private:
  at::Tensor device_, host_;                              // (kSlots, 2) float64
  std::vector<std::pair<at::Tensor, at::Tensor>> slot_views_;  // (L_as, L_ae) of each device slot
};

}  // namespace al_ext::scheduler

#endif  // AL_EXT_WITH_CUDA
