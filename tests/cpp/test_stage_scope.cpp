// The executor's handling of what a stage sets on its worker's thread, and of a leave() that
// throws (csrc/scheduler/executor.cpp: run_stage; stage_device.h: ThreadScope). Built and run
// by tests/test_scheduler.py, and by CMake as a ctest.
//
// A CUDA stage makes its stream the worker thread's current one (c10 keeps the current stream
// per thread), and its leave() throws once the device has failed. Restored on another thread,
// that stream guard would change the other thread's current stream: the calling thread's, where
// the stages are destroyed. No GPU runs here, so this file links the executor with a stage
// device of its own in place of the CPU stage (it defines make_cpu_stage, and cpu_stage.cpp is
// not linked). Its enter() sets a thread-local "current stream" as the CUDA stage's guard sets
// c10's, and the checks are: on which thread that is restored, that the calling thread's own is
// untouched, that the steps ran with the stage's current, and that a throwing leave() is
// reported as its stage's failure (an escaping exception would end the process).
#include <ATen/ops/zeros.h>

#include <cstdio>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/scheduler/executor.h"

using namespace al_ext::scheduler;

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

namespace {

thread_local int current_stream = 0;  // stands for c10's current CUDA stream, kept per thread

// What happened to one stage's scope.
struct ScopeLog {
  std::thread::id set_on, restored_on;
  int restored = 0;
  int steps_off_stream = 0;  // steps that ran without the stage's stream current
};

struct Scenario {
  int failing_leave = -1;              // the stage whose leave() throws
  int failing_block = -1, failing_batch = -1;  // the step that throws
  std::vector<ScopeLog> logs;
  int stages_made = 0;
  std::mutex mutex;
};
Scenario* scenario = nullptr;

constexpr int kStreamBase = 100;  // stage g's stream is kStreamBase + g

class StreamScope final : public ThreadScope {
 public:
  StreamScope(int stream, ScopeLog& log) : before_(current_stream), log_(log) {
    current_stream = stream;
    log_.set_on = std::this_thread::get_id();
  }
  ~StreamScope() override {
    current_stream = before_;
    const std::lock_guard<std::mutex> lock(scenario->mutex);
    log_.restored_on = std::this_thread::get_id();
    ++log_.restored;
  }

 private:
  const int before_;
  ScopeLog& log_;
};

class FakeStage final : public StageDevice {
 public:
  explicit FakeStage(int index) : index_(index) {}

  std::unique_ptr<ThreadScope> enter() override {
    return std::make_unique<StreamScope>(kStreamBase + index_, scenario->logs[index_]);
  }
  void receive(at::Tensor&, at::Tensor&, const ReadyMarker&) override {}
  void before_step() override {}
  void after_step(int block, int batch, const StepResult&) override {
    if (current_stream != kStreamBase + index_) ++scenario->logs[index_].steps_off_stream;
    done_.push_back({block, batch, 0.0, 0.0, 0.0});
  }
  ReadyMarker ready() override { return nullptr; }
  std::vector<StepRecord> finished(bool) override {
    std::vector<StepRecord> out(done_.begin(), done_.end());
    done_.clear();
    return out;
  }
  void leave() override {
    if (index_ == scenario->failing_leave) throw std::runtime_error("the device failed");
  }

 private:
  const int index_;
  std::deque<StepRecord> done_;
};

}  // namespace

// The executor's CPU stage, replaced (see the top of the file).
std::unique_ptr<StageDevice> al_ext::scheduler::make_cpu_stage(int, int) {
  return std::make_unique<FakeStage>(scenario->stages_made++);
}

namespace {

constexpr int kBlocks = 3, kBatches = 5;

// Runs kBlocks blocks over kBatches batches, from a calling thread whose current stream is 7;
// returns the error run() threw ("" if none).
std::string run_scenario(Scenario& s, bool pipelined) {
  scenario = &s;
  s.logs.assign(pipelined ? kBlocks : 1, ScopeLog{});
  const at::Tensor zero = at::zeros({1});
  std::vector<BlockStep> blocks;
  for (int b = 0; b < kBlocks; ++b) {
    blocks.push_back([&s, b, zero, batch = 0](const at::Tensor& s_prev, const at::Tensor& t_prev) mutable {
      if (b == s.failing_block && batch == s.failing_batch) throw std::runtime_error("the step failed");
      ++batch;
      return StepResult{s_prev, t_prev, zero, zero};
    });
  }
  int pulled = 0;
  const BatchSource source = [&]() -> std::optional<Batch> {
    if (pulled == kBatches) return std::nullopt;
    ++pulled;
    return Batch{at::zeros({1}), at::zeros({1})};
  };
  RunOptions options;
  options.pipelined = pipelined;
  current_stream = 7;
  std::string error;
  try {
    run(blocks, source, options);
  } catch (const BlockError& e) {
    error = e.what();
  }
  EXPECT(current_stream == 7);  // the calling thread's own, whatever its stages did
  const auto caller = std::this_thread::get_id();
  for (const ScopeLog& log : s.logs) {
    EXPECT(log.restored == 1);
    EXPECT(log.restored_on == log.set_on);
    EXPECT((log.set_on == caller) == !pipelined);  // pipelined: a worker's thread
    EXPECT(log.steps_off_stream == 0);
  }
  return error;
}

}  // namespace

int main() {
  {
    Scenario s;
    EXPECT(run_scenario(s, true).empty());
  }
  {  // stage 2 (block 2) fails as it leaves, after its last batch
    Scenario s;
    s.failing_leave = 1;
    EXPECT(run_scenario(s, true) == "block 2 failed on batch " + std::to_string(kBatches - 1) + ": the device failed");
  }
  {  // the first stage, which pulls the batches, fails as it leaves: still blamed on its last step
    Scenario s;
    s.failing_leave = 0;
    EXPECT(run_scenario(s, true) == "block 1 failed on batch " + std::to_string(kBatches - 1) + ": the device failed");
  }
  {  // a step fails, then its stage's leave(): the step's failure, the first, is reported
    Scenario s;
    s.failing_leave = 1;
    s.failing_block = 1;
    s.failing_batch = 2;
    EXPECT(run_scenario(s, true) == "block 2 failed on batch 2: the step failed");
  }
  {  // sequential: the stage runs on the calling thread, which gets its own current back
    Scenario s;
    s.failing_leave = 0;
    EXPECT(run_scenario(s, false) ==
           "block 3 failed on batch " + std::to_string(kBatches - 1) + ": the device failed");
  }
  std::printf("%s\n", failures ? "stage scope tests FAILED" : "stage scope tests passed");
  return failures ? 1 : 0;
}
