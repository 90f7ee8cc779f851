// CUDA events for the pipeline's CUDA stages (built with CUDA only): a thin event class, and
// a pool that hands events out again, since creating and destroying two events per step
// costs host time that a small step cannot spare.
#pragma once

#ifdef AL_EXT_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <mutex>
#include <vector>

namespace al_ext::scheduler {

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

  void record(const c10::cuda::CUDAStream& stream) {
    const c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
  }
  // `stream` (on any device) waits on the device for the work recorded before this event.
  void block(const c10::cuda::CUDAStream& stream) const {
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

// Timed events of one device, reused: an event goes back to the pool when its last holder
// lets it go, on any thread (the next stage drops a handoff's event). Recording an event
// again is safe once nothing will wait on its earlier recording: cudaStreamWaitEvent takes
// the event's state when it is called.
class EventPool : public std::enable_shared_from_this<EventPool> {
 public:
  static std::shared_ptr<EventPool> create(c10::DeviceIndex device) {
    return std::shared_ptr<EventPool>(new EventPool(device));
  }

  std::shared_ptr<CudaEvent> acquire() {
    std::unique_ptr<CudaEvent> event;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        event = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!event) event = std::make_unique<CudaEvent>(device_, /*timing=*/true);
    // The deleter holds the pool, so the pool outlives every event it handed out.
    return std::shared_ptr<CudaEvent>(event.release(), [pool = shared_from_this()](CudaEvent* e) {
      const std::lock_guard<std::mutex> lock(pool->mutex_);
      pool->free_.emplace_back(e);
    });
  }

 private:
  explicit EventPool(c10::DeviceIndex device) : device_(device) {}

  const c10::DeviceIndex device_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<CudaEvent>> free_;
};

}  // namespace al_ext::scheduler

#endif  // AL_EXT_WITH_CUDA
