// A pipeline stage on the CPU: its blocks run on the worker's thread with its own share of
// the intra-op (OpenMP) threads, and a step is done when it returns.
#include <omp.h>

#include <chrono>
#include <deque>

#include "stage_device.h"

namespace al_ext::scheduler {
namespace {

using Clock = std::chrono::steady_clock;

// The worker's intra-op thread count for the run (OpenMP's count is per thread), and back.
class IntraOpThreads final : public ThreadScope {
 public:
  explicit IntraOpThreads(int threads) : before_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~IntraOpThreads() override { omp_set_num_threads(before_); }

 private:
  const int before_;
};

class CpuStage final : public StageDevice {
 public:
  CpuStage(int threads, int hold_back) : threads_(threads), hold_back_(hold_back) {}

  std::unique_ptr<ThreadScope> enter() override { return std::make_unique<IntraOpThreads>(threads_); }

  void receive(at::Tensor&, at::Tensor&, const ReadyMarker&) override {}  // ready once handed on

  void before_step() override { start_ = Clock::now(); }

  void after_step(int block, int batch, const StepResult& out) override {
    const double busy = std::chrono::duration<double>(Clock::now() - start_).count();
    done_.push_back({block, batch, busy, out.loss_as.item<double>(), out.loss_ae.item<double>()});
  }

  ReadyMarker ready() override { return nullptr; }

  // Held back as a CUDA stage's results are when its stream runs `hold_back` batches behind.
  std::vector<StepRecord> finished(bool all) override {
    std::vector<StepRecord> out;
    while (!done_.empty() && (all || done_.back().batch - done_.front().batch >= hold_back_)) {
      out.push_back(done_.front());
      done_.pop_front();
    }
    return out;
  }

  void leave() override {}  // nothing runs behind the worker's thread

 private:
  const int threads_, hold_back_;
  Clock::time_point start_;
  std::deque<StepRecord> done_;
};

}  // namespace

std::unique_ptr<StageDevice> make_cpu_stage(int threads, int hold_back) {
  return std::make_unique<CpuStage>(threads, hold_back);
}

}  // namespace al_ext::scheduler
