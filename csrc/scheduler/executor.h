// Runs the blocks of an AL network over a stream of batches, either pipelined (one worker
// thread per stage of consecutive blocks, or CPU workers sharing the blocks; activations
// handed on through bounded queues) or sequentially (on the calling thread, batch by batch,
// block by block: a pipeline of one stage). Only (s, t) flow from a block to the next;
// nothing flows back, so block i trains on batch j while block i + 1 trains on batch j - 1,
// and every block sees the batches in the same order as in the sequential loop. Batches are
// pulled from the source only as the first block gets to them, so memory is bounded by the
// queues, not by the stream's length.
// Where a stage runs (CPU threads, or a CUDA stream with events at the handoffs) is its
// StageDevice. On the CPU the workers may instead share the blocks (RunOptions::shared_workers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "stage_device.h"

namespace al_ext::scheduler {

struct BlockStats {
  double busy_s = 0.0;  // inside the block's step
  int64_t batches = 0;
};

// A pipeline worker runs a group of consecutive blocks (a stage) on each batch in turn.
struct WorkerStats {
  int first_block = 0, end_block = 0;  // blocks [first_block, end_block): every block if shared
  double busy_s = 0.0;                 // inside its blocks' steps
  double wait_s = 0.0;                 // waiting for input, or for room downstream
  int64_t peak_queued_bytes = 0;       // most bytes of this stage's outputs queued at once; shared
                                       // workers: of every block's outputs
};

using Batch = std::pair<at::Tensor, at::Tensor>;  // (s_0, t_0)

// The stream of batches: called by one thread at a time (the first stage's, or the shared
// worker running the first block), once per batch, in order; nullopt ends the stream.
using BatchSource = std::function<std::optional<Batch>()>;

// Called on the calling thread, in batch order, as soon as every block has trained on a
// batch: its index and its losses (blocks x 2: L_as, L_ae). Returning true stops the run
// gracefully: no new batch is pulled, and those already pulled still train on every block,
// so every block has seen the same batches. An exception stops the run at once and is
// rethrown once every worker has stopped.
using BatchDone = std::function<bool(int batch, const std::vector<double>& losses)>;

struct RunOptions {
  bool pipelined = true;
  // First block of each pipeline stage (see balanced_groups); empty: one block per stage.
  std::vector<int> stage_starts;
  int max_in_flight = 2;       // batches a queue between two stages may hold; on CUDA, also
                               // the batches a stage's stream may run behind its worker
  int threads_per_stage = 1;   // intra-op threads of each worker (CPU)
  // Pipelined, on the CPU: this many workers, each taking whichever block can step next (the
  // deepest first), instead of one fixed group of consecutive blocks per worker. Blocks of
  // unequal cost then share the threads evenly, where consecutive groups may not split them
  // evenly. A block still steps on one batch at a time, in order, so training is unchanged.
  // 0: fixed stages (stage_starts); else stage_starts must be empty.
  int shared_workers = 0;
  // Each stage's device (the device of its blocks); empty: every stage on the CPU. A CUDA
  // stage runs on a stream of its own (in sequential mode too: one stream for every block).
  std::vector<c10::Device> stage_devices;
  // CPU stages read each step's results this many batches late, as CUDA stages may (see
  // make_cpu_stage): for tests of late results on a machine without a GPU.
  int hold_back_results = 0;
  // Polled by the calling thread while the run goes on; true stops the run.
  std::function<bool()> interrupted;
  BatchDone on_batch;  // optional
  // Pipelined: the first block pulls batch j only once on_batch has been called for batch
  // j - max_unreported, so that a slow reader (a loop over Pipeline.train) slows training
  // rather than falling behind it. 0: no limit.
  int max_unreported = 0;
};

struct RunResult {
  at::Tensor losses;  // (batches, blocks, 2) float64: (L_as, L_ae) of each block on each batch trained
  std::vector<BlockStats> blocks;
  std::vector<WorkerStats> workers;  // pipelined mode only
  double wall_s = 0.0;
};

// A stage failed: which block, on which batch, and why; `non_finite_loss` names the loss
// ("L_as" or "L_ae") when the step was refused for a non-finite loss, and is empty otherwise.
// On the CPU nothing after it ran in that stage; on CUDA, steps enqueued before the failure
// was read (up to max_in_flight batches) may have run.
class BlockError : public std::runtime_error {
 public:
  BlockError(int block, int batch, const std::string& why, std::string non_finite_loss = {})
      : std::runtime_error("block " + std::to_string(block + 1) + " failed on batch " + std::to_string(batch) +
                           ": " + why),
        block(block),
        batch(batch),
        non_finite_loss(std::move(non_finite_loss)) {}
  int block, batch;
  std::string non_finite_loss;
};

// The caller asked to stop (interrupted() returned true); the workers have been joined.
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("interrupted") {}
};

// Trains every block on every batch of the stream. Throws BlockError, Interrupted, or what
// on_batch threw, after all workers have stopped; no thread outlives the call.
RunResult run(const std::vector<BlockStep>& blocks, const BatchSource& source, const RunOptions& options);

}  // namespace al_ext::scheduler
