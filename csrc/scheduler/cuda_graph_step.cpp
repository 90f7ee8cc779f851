// A block step replayed from a CUDA graph (built with CUDA only). A small block's step is
// some thirty kernel launches, and at widths like 512 the host cannot launch them as fast
// as the GPU runs them; one graph launch replaces them all.
//
// The first call runs the step eagerly: it warms up what must not first happen inside a
// capture (cuBLAS handles and workspaces, the allocator's pools). The second captures it
// on the same stream, into the graph's private memory pool, with static input buffers; from
// then on each call copies (s_prev, t_prev) into those buffers and replays.
//
// Copies per replay, and why each stays or went:
// - Outputs: none here. The graph writes s, t and the losses to the same addresses every
//   time, and the step returns those buffers as they are (outputs_reused). The stage reads
//   them on this stream before the next replay: the losses go to its loss ring at once, and
//   the stage's next block reads s and t. Only where s and t leave the stage does the executor
//   copy them (executor.cpp: owned), since a queue may hold them over the next replay; after
//   the last block of all, nothing copies them.
// - Inputs: one copy each of s_prev and t_prev, into the buffers the graph reads. A graph
//   reads fixed addresses, and what arrives does not live there: a batch from the source (the
//   caller's tensor, which must not be written), a handoff from another stage (its own
//   memory, one per batch in flight), or the previous block's outputs. Only the last could be
//   read in place, and only by knowing that they are a graph's static buffers, which a step
//   cannot tell from its arguments.
// So between two graphed blocks of one stage s and t are copied once; from a graphed block to
// one in the next stage, twice: into the handoff, then into the consumer's graph (a third, the
// transfer, if the stages are on different devices). One copy could go only if the producer's
// next replay waited, on the device, for the consumer to have read its buffers, and the
// consumer may not even have taken the handoff from the queue by then.
//
// A batch of another shape (a short last batch) runs eagerly. What the step reads besides
// its inputs must keep its address and must not depend on the host between calls: the
// fused update ops qualify, with Adam's step number kept on the device (the step_tensor
// form of al_ext::dense_block_adam_step_).
#ifdef AL_EXT_WITH_CUDA

#include <ATen/cuda/CUDAGraph.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <mutex>

#include "block_steps.h"

namespace al_ext::scheduler {
namespace {

class GraphedStep {
 public:
  explicit GraphedStep(BlockStep step) : step_(std::move(step)) {}

  StepResult operator()(const at::Tensor& s_prev, const at::Tensor& t_prev) {
    if (!warmed_up_) {
      warmed_up_ = true;
      shape_s_ = s_prev.sizes().vec();
      shape_t_ = t_prev.sizes().vec();
      return step_(s_prev, t_prev);
    }
    if (s_prev.sizes() != shape_s_ || t_prev.sizes() != shape_t_ || !s_prev.is_cuda()) return step_(s_prev, t_prev);
    if (!graph_) capture(s_prev, t_prev);
    static_s_.copy_(s_prev, /*non_blocking=*/true);
    static_t_.copy_(t_prev, /*non_blocking=*/true);
    graph_->replay();
    return {out_.s, out_.t, out_.loss_as, out_.loss_ae, /*outputs_reused=*/true};
  }

 private:
  // On the current stream, which the warm-up call ran on (so cuBLAS's workspace for it
  // exists, outside the graph's pool) and which no other thread uses: a pipeline stage's.
  void capture(const at::Tensor& s_prev, const at::Tensor& t_prev) {
    const c10::cuda::CUDAGuard device_guard(s_prev.device());
    TORCH_CHECK(c10::cuda::getCurrentCUDAStream() != c10::cuda::getDefaultCUDAStream(),
                "a block step is captured in a CUDA graph on the current stream, which must not be the default "
                "stream (the pipeline gives each stage a stream of its own)");
    static_s_ = at::empty_like(s_prev, at::MemoryFormat::Contiguous);
    static_t_ = at::empty_like(t_prev, at::MemoryFormat::Contiguous);
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    // One capture at a time: every capture registers torch's default CUDA generator and
    // resets its capture state, which is not guarded against other threads. Capturing
    // waits for nothing, so holding the lock is short.
    static std::mutex one_capture_at_a_time;
    const std::lock_guard<std::mutex> lock(one_capture_at_a_time);
    // Thread-local mode: the other stages' threads go on launching and allocating meanwhile.
    graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      out_ = step_(static_s_, static_t_);
    } catch (...) {
      abandon_capture(*graph, s_prev.device().index());
      throw;
    }
    graph->capture_end();
    graph_ = std::move(graph);
  }

  // After a step failed inside the capture: takes the stream and the allocator out of capture
  // mode before the graph is destroyed. capture_end() does both, but throws at the first
  // thing that fails (an invalidated capture fails cudaStreamEndCapture) and then leaves the
  // allocator routing this thread's allocations into the graph's pool through a filter that
  // points into the destroyed graph. So each is ended here too, whichever is still on.
  static void abandon_capture(at::cuda::CUDAGraph& graph, c10::DeviceIndex device) {
    try {
      graph.capture_end();
      return;
    } catch (...) {
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
      cudaGraph_t partial = nullptr;
      if (cudaStreamEndCapture(stream, &partial) == cudaSuccess && partial != nullptr) cudaGraphDestroy(partial);
    }
    (void)cudaGetLastError();  // the capture's errors are the step's, already in flight
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(device, graph.pool());
    } catch (...) {
      // capture_end got as far as ending it
    }
  }

  BlockStep step_;
  bool warmed_up_ = false;
  std::vector<int64_t> shape_s_, shape_t_;  // the batch shape the graph is for
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  at::Tensor static_s_, static_t_;  // the graph's inputs
  StepResult out_;                  // the graph's outputs
};

}  // namespace

BlockStep cuda_graph_block_step(BlockStep step) {
  auto graphed = std::make_shared<GraphedStep>(std::move(step));
  return [graphed](const at::Tensor& s_prev, const at::Tensor& t_prev) { return (*graphed)(s_prev, t_prev); };
}

}  // namespace al_ext::scheduler

#endif  // AL_EXT_WITH_CUDA
