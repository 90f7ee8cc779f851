// A pipeline stage on a CUDA device (built with CUDA only). Its blocks' steps are enqueued on
// the stage's stream; a timing event before and after each step gives the block's busy time,
// and the step's losses are copied into pinned host memory behind it. A handoff carries the
// event after the batch's last block: the next stage's stream waits for it, the host does not.
// Tensors read on a stream other than the one that allocated them are recorded on it, so the
// caching allocator cannot hand their memory out again before that stream is done with them.
#ifdef AL_EXT_WITH_CUDA

#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <deque>
#include <map>
#include <optional>

#include "stage_device.h"

namespace al_ext::scheduler {
namespace {

using c10::cuda::CUDAStream;

// A CUDA event of our own: torch's CUDAEvent moved from ATen to c10 between the releases
// this builds against, and these few calls are all that is needed.
class CudaEvent {
 public:
  CudaEvent(c10::DeviceIndex device, bool timing) : device_(device) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~CudaEvent() {
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK_WARN(cudaEventDestroy(event_));
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void record(const CUDAStream& stream) {
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
  }
  // `stream` (on any device) waits on the device for the work recorded before this event.
  void block(const CUDAStream& stream) const {
    const c10::cuda::CUDAGuard guard(stream.device_index());
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), event_, 0));
  }
  bool query() const {
    const cudaError_t status = cudaEventQuery(event_);
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    C10_CUDA_CHECK(status);
    return true;
  }
  void synchronize() const { C10_CUDA_CHECK(cudaEventSynchronize(event_)); }
  // Both events timed and completed.
  double seconds_since(const CudaEvent& start) const {
    float ms = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
    return ms / 1e3;
  }

 private:
  const c10::DeviceIndex device_;
  cudaEvent_t event_ = nullptr;
};

void record_on(const CUDAStream& stream, const at::Tensor& t) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

class CudaStage final : public StageDevice {
 public:
  CudaStage(c10::Device device, int lag)
      : device_(device),
        caller_(c10::cuda::getCurrentCUDAStream(device.index())),
        stream_(c10::cuda::getStreamFromPool(false, device.index())),
        lag_(lag),
        started_(device.index(), /*timing=*/false) {
    // The batches and the parameters were last written on the caller's stream.
    started_.record(caller_);
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
  }

  void enter() override {
    guard_.emplace(stream_);  // this thread's current device and stream, for every op of the stage
    started_.block(stream_);
  }

  void receive(at::Tensor& s, at::Tensor& t, const ReadyMarker& ready) override {
    const auto& event = *static_cast<const CudaEvent*>(ready.get());
    if (s.device() == device_) {
      event.block(stream_);
      record_on(stream_, s);
      record_on(stream_, t);
      return;
    }
    // From another device: copied on a copy stream of the source device, after the producer.
    // ATen copies across devices on the source's current stream and makes the destination's
    // current stream (this stage's) wait for the copy.
    const CUDAStream copy = copy_stream(s.device());
    event.block(copy);
    at::Tensor s_here, t_here;
    {
      const c10::cuda::CUDAMultiStreamGuard streams({copy, stream_});
      s_here = s.to(device_, /*non_blocking=*/true);
      t_here = t.to(device_, /*non_blocking=*/true);
    }
    record_on(copy, s);
    record_on(copy, t);
    s = std::move(s_here);
    t = std::move(t_here);
  }

  void before_step() override {
    step_start_ = std::make_unique<CudaEvent>(device_.index(), /*timing=*/true);
    step_start_->record(stream_);
  }

  void after_step(int block, int batch, const StepResult& out) override {
    Pending p{block, batch, std::move(step_start_), std::make_shared<CudaEvent>(device_.index(), /*timing=*/true),
              at::Tensor()};
    const at::Tensor losses = at::stack({out.loss_as.reshape({}), out.loss_ae.reshape({})});
    p.losses = at::empty({2}, losses.options().device(at::kCPU).pinned_memory(true));
    p.losses.copy_(losses, /*non_blocking=*/true);
    p.end->record(stream_);
    last_end_ = p.end;
    pending_.push_back(std::move(p));
  }

  // Not pending_.back().end: finished() may already have retired that step (the GPU can be
  // done with a small step before the host asks), which would leave pending_ empty.
  ReadyMarker ready() override { return last_end_; }

  std::vector<StepRecord> finished(bool all) override {
    std::vector<StepRecord> done;
    while (!pending_.empty()) {
      Pending& p = pending_.front();
      const bool too_far_ahead = pending_.back().batch - p.batch >= lag_;
      if (!all && !too_far_ahead && !p.end->query()) break;
      p.end->synchronize();
      const at::Tensor losses = p.losses.to(at::kDouble);
      done.push_back({p.block, p.batch, p.end->seconds_since(*p.start), losses[0].item<double>(),
                      losses[1].item<double>()});
      pending_.pop_front();
    }
    return done;
  }

  void leave() override {
    CudaEvent done(device_.index(), /*timing=*/false);
    done.record(stream_);
    done.block(caller_);  // whatever the caller enqueues next sees this stage's updates
    // Entry 0 of a stat array is the aggregate over the allocator's pools (StatType::AGGREGATE,
    // whose namespace differs between torch releases).
    peak_bytes_ = c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index()).allocated_bytes[0].peak;
    guard_.reset();
  }

  int64_t peak_device_bytes() const override { return peak_bytes_; }

 private:
  struct Pending {
    int block, batch;
    std::unique_ptr<CudaEvent> start;
    std::shared_ptr<CudaEvent> end;  // also the handoff's ready marker after a batch's last block
    at::Tensor losses;               // pinned: (L_as, L_ae), valid once `end` has completed
  };

  CUDAStream copy_stream(c10::Device source) {
    auto it = copy_streams_.find(source.index());
    if (it == copy_streams_.end()) {
      it = copy_streams_.emplace(source.index(), c10::cuda::getStreamFromPool(false, source.index())).first;
    }
    return it->second;
  }

  const c10::Device device_;
  const CUDAStream caller_, stream_;
  const int lag_;
  CudaEvent started_;
  std::optional<c10::cuda::CUDAStreamGuard> guard_;
  std::unique_ptr<CudaEvent> step_start_;
  std::deque<Pending> pending_;
  std::shared_ptr<CudaEvent> last_end_;  // after the latest step: what a handoff waits for
  std::map<c10::DeviceIndex, CUDAStream> copy_streams_;
  int64_t peak_bytes_ = 0;
};

}  // namespace

std::unique_ptr<StageDevice> make_cuda_stage(c10::Device device, int lag) {
  return std::make_unique<CudaStage>(device, lag);
}

}  // namespace al_ext::scheduler

#endif  // AL_EXT_WITH_CUDA
