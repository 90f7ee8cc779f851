// Where a pipeline stage runs its blocks, and what that changes in the worker's loop.
//
// On the CPU a block's step is done when it returns: its time and losses are known at once.
// On a CUDA device a step only enqueues work on the stage's own stream. The next stage's
// stream waits for it on the device (a CUDA event travels with the handoff), and the stage
// reads its steps' times and losses a few batches later, once their events have completed:
// the host never waits for the device in the steady state, only when it runs more than
// `lag` batches ahead of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace al_ext::scheduler {

// What a block's training step on one batch returns.
struct StepResult {
  at::Tensor s, t, loss_as, loss_ae;
  // s and t are buffers the step writes again at its next call (a CUDA graph's static
  // outputs): valid for work ordered before that call, on the stage's stream (or thread). The
  // next block of the same stage reads them as they are; the executor copies them before they
  // leave the stage (executor.cpp: owned), since a queue may hold them over the next call.
  bool outputs_reused = false;
};

// Trains one block on one batch: (s_prev, t_prev) -> outputs and losses. On CUDA it runs on
// the current stream and need not wait for the device.
using BlockStep = std::function<StepResult(const at::Tensor& s_prev, const at::Tensor& t_prev)>;

// A step whose results can be read: its block's busy time and its losses.
struct StepRecord {
  int block = 0, batch = 0;
  double busy_s = 0.0;
  double loss_as = 0.0, loss_ae = 0.0;
};

// Whatever the next stage must wait for before it reads a handoff (on CUDA, an event).
using ReadyMarker = std::shared_ptr<void>;

// What a stage sets on the worker's thread for its run, undone when destroyed: the intra-op
// thread count on the CPU, the current device and stream on CUDA. Such state belongs to one
// thread; undone on another, it would change that thread's current stream. So the executor,
// not the stage, holds it, and destroys it on the worker's thread after leave(), whether or not
// leave() threw.
class ThreadScope {
 public:
  virtual ~ThreadScope() = default;
};

class StageDevice {
 public:
  virtual ~StageDevice() = default;
  // On the worker's thread, before its first batch.
  [[nodiscard]] virtual std::unique_ptr<ThreadScope> enter() = 0;
  // Makes a handed-on (s, t) usable here: waits for `ready` and brings them to this device.
  virtual void receive(at::Tensor& s, at::Tensor& t, const ReadyMarker& ready) = 0;
  // Around each block's step.
  virtual void before_step() = 0;
  virtual void after_step(int block, int batch, const StepResult& out) = 0;
  // After a batch's last block: what the next stage waits for.
  virtual ReadyMarker ready() = 0;
  // The steps whose results can now be read, oldest first; `all` waits for every step so far.
  virtual std::vector<StepRecord> finished(bool all) = 0;
  // On the worker's thread after its last batch, or after a failure, while enter()'s scope
  // still holds: the caller sees this stage's work as done (on CUDA, the caller's stream waits
  // for the stage's stream).
  virtual void leave() = 0;
  // A failure's message, with what the device knows of where it came from: on CUDA, a fault
  // surfaces at a later call than the one that caused it, so the host's block may be wrong.
  virtual std::string explain_failure(const std::string& why) { return why; }
};

// `threads`: this stage's intra-op (OpenMP) threads. `hold_back`: each step's results are
// read only once the stage has stepped a batch that many batches later (or at the end), as
// a CUDA stage's are when its stream runs behind: the executor's handling of late results
// is then tested on the CPU. 0 (the CPU's own way): at once.
std::unique_ptr<StageDevice> make_cpu_stage(int threads, int hold_back = 0);

#ifdef AL_EXT_WITH_CUDA
// A stage on a CUDA device, on a stream of its own: never the default stream, on which a
// block step could not be captured in a CUDA graph. Construct it on the calling thread: it
// starts after the work already enqueued on the caller's stream (the batches, the
// parameters), and the caller's stream waits for it when it leaves.
std::unique_ptr<StageDevice> make_cuda_stage(c10::Device device, int lag);
#endif

}  // namespace al_ext::scheduler
