// A pipeline stage on a CUDA device (built with CUDA only). Its blocks' steps are enqueued on
// the stage's stream; a timing event before and after each step gives the block's busy time,
// and the step's losses go to a device buffer behind it, which reaches pinned host memory in
// one copy per batch (cuda_loss_ring.h). Events come from a pool. A handoff carries the event
// after the batch's last block: the next stage's stream waits for it, the host does not.
// Tensors read on a stream other than the one that allocated them are recorded on it, so the
// caching allocator cannot hand their memory out again before that stream is done with them.
#ifdef AL_EXT_WITH_CUDA

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <deque>
#include <map>
#include <optional>
#include <string>

#include "cuda_event.h"
#include "cuda_loss_ring.h"
#include "stage_device.h"

namespace al_ext::scheduler {
namespace {

using c10::cuda::CUDAStream;

void record_on(const CUDAStream& stream, const at::Tensor& t) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

// The stage's device and stream as the worker thread's current ones, for every op of the
// stage; the executor restores the thread's own on that thread (stage_device.h: ThreadScope).
class CurrentStream final : public ThreadScope {
 public:
  explicit CurrentStream(const CUDAStream& stream) : guard_(stream) {}

 private:
  const c10::cuda::CUDAStreamGuard guard_;
};

class CudaStage final : public StageDevice {
 public:
  CudaStage(c10::Device device, int lag)
      : device_(device),
        caller_(c10::cuda::getCurrentCUDAStream(device.index())),
        stream_(c10::cuda::getStreamFromPool(false, device.index())),
        lag_(lag),
        events_(EventPool::create(device.index())),
        losses_(device),
        started_(events_->acquire()) {
    // The batches and the parameters were last written on the caller's stream.
    started_->record(caller_);
  }

  std::unique_ptr<ThreadScope> enter() override {
    auto scope = std::make_unique<CurrentStream>(stream_);
    started_->block(stream_);
    return scope;
  }

  void receive(at::Tensor& s, at::Tensor& t, const ReadyMarker& ready) override {
    copy_batch_losses();  // the previous batch's, before this one's work
    const auto& event = *static_cast<const CudaEvent*>(ready.get());
    if (s.device() == device_) {
      event.block(stream_);
      record_on(stream_, s);
      record_on(stream_, t);
      return;
    }
    // From another device: copied on a stream of the source device once the producer is done,
    // into memory of this device's receiving stream. ATen's cross-device copy also waits for
    // the destination's current stream; were that the stage's own, every copy would wait for
    // the stage's previous batch, and transfers and compute would take turns. The stage's
    // stream waits for the copy's event only.
    const Transfer& x = transfer(s.device());
    event.block(x.copy);
    at::Tensor s_here, t_here;
    {
      const c10::cuda::CUDAMultiStreamGuard streams({x.copy, x.receive});
      s_here = s.to(device_, /*non_blocking=*/true);
      t_here = t.to(device_, /*non_blocking=*/true);
    }
    const std::shared_ptr<CudaEvent> copied = events_->acquire();
    copied->record(x.receive);  // ATen made the receiving stream wait for the copy
    copied->block(stream_);
    record_on(x.copy, s);
    record_on(x.copy, t);
    record_on(stream_, s_here);
    record_on(stream_, t_here);
    s = std::move(s_here);
    t = std::move(t_here);
  }

  void before_step() override {
    step_start_ = events_->acquire();
    step_start_->record(stream_);
  }

  void after_step(int block, int batch, const StepResult& out) override {
    if (batch != open_batch_) copy_batch_losses();  // a new batch: the last one's losses go now
    open_batch_ = batch;
    // The step whose slot this one takes, if still unread, is read first.
    const int64_t reused = steps_ - LossRing::kSlots;
    if (!pending_.empty() && reused >= pending_.front().step) settle(pending_[reused - pending_.front().step]);
    losses_.write(steps_, out.loss_as, out.loss_ae);
    Pending p{block, batch, steps_++, std::move(step_start_), events_->acquire(), nullptr, std::nullopt};
    p.end->record(stream_);
    last_end_ = p.end;
    pending_.push_back(std::move(p));
  }

  // Not pending_.back().end: finished() may already have retired that step (the GPU can be
  // done with a small step before the host asks), which would leave pending_ empty.
  ReadyMarker ready() override {
    copy_batch_losses();  // the batch's last block: its losses go to the host behind it
    return last_end_;
  }

  std::vector<StepRecord> finished(bool all) override {
    if (all) copy_batch_losses();
    std::vector<StepRecord> done;
    while (!pending_.empty()) {
      Pending& p = pending_.front();
      const bool too_far_ahead = pending_.back().batch - p.batch >= lag_;
      if (!p.record && !all && !too_far_ahead && !(p.copied && p.copied->query())) break;
      settle(p);
      done.push_back(*p.record);
      pending_.pop_front();
    }
    return done;
  }

  // A CUDA error may surface at a later call than the one that caused it, and so be blamed
  // on whichever block the host was at: say so, with the steps it may have come from.
  std::string explain_failure(const std::string& why) override {
    const cudaError_t status = cudaStreamQuery(stream_.stream());
    if (status == cudaSuccess || status == cudaErrorNotReady) {
      (void)cudaGetLastError();  // cudaErrorNotReady is no error
      return why;
    }
    std::string steps = "this one";
    if (!pending_.empty()) {
      steps = "block " + std::to_string(pending_.front().block + 1) + " on batch " +
              std::to_string(pending_.front().batch) + " (the oldest not known to be done) up to this one";
    }
    return why + " [the device reports a fault at a later call than the one that caused it: it may lie in any " +
           "step enqueued on this stage's stream from " + steps + "; CUDA_LAUNCH_BLOCKING=1 reports it at its step]";
  }

  // After a device fault this throws (the event cannot be recorded); the executor reports it
  // and still restores the worker's stream on the worker's thread.
  void leave() override {
    const std::shared_ptr<CudaEvent> done = events_->acquire();
    done->record(stream_);
    done->block(caller_);  // whatever the caller enqueues next sees this stage's updates
  }

 private:
  struct Pending {
    int block, batch;
    int64_t step;                          // its number in the loss ring
    std::shared_ptr<CudaEvent> start, end;  // end: also the handoff's ready marker after a batch's last block
    std::shared_ptr<CudaEvent> copied;     // after the copy of its batch's losses to the host; null before
    std::optional<StepRecord> record;      // once read
  };

  struct Transfer {
    CUDAStream copy;     // on the source device
    CUDAStream receive;  // on this stage's device
  };

  // The losses of the steps not copied yet (the open batch's) to the host, in one copy.
  void copy_batch_losses() {
    if (copied_steps_ == steps_) return;
    losses_.copy_to_host(copied_steps_, steps_, stream_);
    const std::shared_ptr<CudaEvent> copied = events_->acquire();
    copied->record(stream_);
    for (Pending& p : pending_) {
      if (!p.copied) p.copied = copied;
    }
    copied_steps_ = steps_;
  }

  // Waits for the step's losses on the host, and reads them and its time.
  void settle(Pending& p) {
    if (p.record) return;
    if (!p.copied) copy_batch_losses();
    p.copied->synchronize();
    const auto [loss_as, loss_ae] = losses_.read(p.step);
    p.record = StepRecord{p.block, p.batch, p.end->seconds_since(*p.start), loss_as, loss_ae};
  }

  const Transfer& transfer(c10::Device source) {
    auto it = transfers_.find(source.index());
    if (it == transfers_.end()) {
      it = transfers_
               .emplace(source.index(), Transfer{c10::cuda::getStreamFromPool(false, source.index()),
                                                 c10::cuda::getStreamFromPool(false, device_.index())})
               .first;
    }
    return it->second;
  }

  const c10::Device device_;
  const CUDAStream caller_, stream_;
  const int lag_;
  std::shared_ptr<EventPool> events_;
  LossRing losses_;
  std::shared_ptr<CudaEvent> started_;
  std::shared_ptr<CudaEvent> step_start_;
  std::deque<Pending> pending_;
  std::shared_ptr<CudaEvent> last_end_;  // after the latest step: what a handoff waits for
  int64_t steps_ = 0, copied_steps_ = 0;  // steps enqueued, and those whose losses went to the host
  int open_batch_ = -1;                    // the batch of the latest step
  std::map<c10::DeviceIndex, Transfer> transfers_;
};

}  // namespace

std::unique_ptr<StageDevice> make_cuda_stage(c10::Device device, int lag) {
  return std::make_unique<CudaStage>(device, lag);
}

}  // namespace al_ext::scheduler

#endif  // AL_EXT_WITH_CUDA
