#include "executor.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>

namespace al_ext::scheduler {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Handoff {
  int batch;
  at::Tensor s, t;
  ReadyMarker ready;  // what the consumer waits for before reading s and t
};

// The edge between two stages: at most `capacity` batches in flight. finish() says that no
// more batches come: pop() returns nullopt once the rest are taken. close() wakes every
// waiter at once, so that a failure anywhere ends every wait.
class BoundedQueue {
 public:
  explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}

  bool push(Handoff item) {
    std::unique_lock<std::mutex> lock(mutex_);
    room_.wait(lock, [&] { return closed_ || items_.size() < capacity_; });
    if (closed_) return false;
    bytes_ += item.s.nbytes() + item.t.nbytes();
    peak_bytes_ = std::max(peak_bytes_, bytes_);
    items_.push_back(std::move(item));
    ready_.notify_one();
    return true;
  }

  std::optional<Handoff> pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [&] { return closed_ || finished_ || !items_.empty(); });
    if (closed_ || items_.empty()) return std::nullopt;
    Handoff item = std::move(items_.front());
    items_.pop_front();
    bytes_ -= item.s.nbytes() + item.t.nbytes();
    room_.notify_one();
    return item;
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mutex_);
    finished_ = true;
    ready_.notify_all();
  }

  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    room_.notify_all();
    ready_.notify_all();
  }

  int64_t peak_bytes() const { return peak_bytes_; }

 private:
  const size_t capacity_;
  std::mutex mutex_;
  std::condition_variable room_, ready_;
  std::deque<Handoff> items_;
  bool closed_ = false, finished_ = false;
  int64_t bytes_ = 0, peak_bytes_ = 0;
};

// Each batch's losses, as the stages read them (a CUDA stage reads its steps' results late,
// so not in order across stages), and which batches every block has trained on, in order.
// Two flat arrays that grow by doubling: a small allocation per batch, kept for the whole
// run, would pin the freed activations' memory below it and make the heap creep.
class LossBook {
 public:
  explicit LossBook(int blocks) : blocks_(blocks) {}

  void add_batch() {
    std::lock_guard<std::mutex> lock(mutex_);
    values_.resize(values_.size() + 2 * blocks_, 0.0);
    recorded_.push_back(0);
  }

  // Returns whether batches became complete (every block recorded, every earlier batch complete).
  bool record(int block, int batch, double loss_as, double loss_ae) {
    std::lock_guard<std::mutex> lock(mutex_);
    double* row = values_.data() + static_cast<size_t>(batch) * 2 * blocks_;
    row[2 * block] = loss_as;
    row[2 * block + 1] = loss_ae;
    ++recorded_[batch];
    const size_t before = complete_;
    while (complete_ < recorded_.size() && recorded_[complete_] == blocks_) ++complete_;
    return complete_ > before;
  }

  // The complete batches not taken yet, as (index, losses), oldest first.
  std::vector<std::pair<int, std::vector<double>>> take_complete() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<int, std::vector<double>>> out;
    for (; taken_ < complete_; ++taken_) {
      const double* row = values_.data() + taken_ * 2 * blocks_;
      out.emplace_back(static_cast<int>(taken_), std::vector<double>(row, row + 2 * blocks_));
    }
    return out;
  }

  // (complete batches, blocks, 2) float64.
  at::Tensor losses() {
    std::lock_guard<std::mutex> lock(mutex_);
    at::Tensor out = at::empty({static_cast<int64_t>(complete_), blocks_, 2}, at::kDouble);
    std::copy(values_.begin(), values_.begin() + complete_ * 2 * blocks_, out.mutable_data_ptr<double>());
    return out;
  }

 private:
  const int blocks_;
  std::mutex mutex_;
  std::vector<double> values_;  // (batch, block, 2)
  std::vector<int> recorded_;   // per batch: how many blocks have recorded it
  size_t complete_ = 0, taken_ = 0;
};

// Shared state of one run: the stages, the first failure, and the queues to close when it happens.
class Run {
 public:
  Run(const std::vector<BlockStep>& blocks, const BatchSource& source, const RunOptions& options)
      : blocks_(blocks), source_(source), options_(options), stats_(blocks.size()),
        book_(static_cast<int>(blocks.size())) {
    const int depth = static_cast<int>(blocks.size());
    if (shared()) {
      for (int g = 0; g < options.shared_workers; ++g) workers_.push_back({0, depth});
      inputs_.resize(blocks.size());
      busy_.assign(blocks.size(), 0);
    } else {
      // Sequential mode is a pipeline of one stage, run on the calling thread.
      std::vector<int> starts = options.pipelined ? options.stage_starts : std::vector<int>{0};
      if (starts.empty()) {
        for (int i = 0; i < depth; ++i) starts.push_back(i);
      }
      for (size_t g = 0; g < starts.size(); ++g) {
        workers_.push_back({starts[g], g + 1 < starts.size() ? starts[g + 1] : depth});
      }
      for (size_t g = 0; g + 1 < workers_.size(); ++g) {
        queues_.push_back(std::make_unique<BoundedQueue>(static_cast<size_t>(options.max_in_flight)));
      }
    }
    for (size_t g = 0; g < workers_.size(); ++g) {
      devices_.push_back(make_stage(options.stage_devices.empty() ? c10::Device(c10::kCPU) : options.stage_devices[g]));
    }
  }

  RunResult execute() {
    const auto start = Clock::now();
    if (options_.pipelined) {
      std::vector<std::thread> threads;
      for (size_t g = 0; g < workers_.size(); ++g) threads.emplace_back([this, g] { worker(g); });
      wait_for(threads.size());
      for (auto& t : threads) t.join();
    } else {
      // On the calling thread: its OpenMP pool is warm. A parallel region started from a
      // fresh thread costs several times more (libgomp throttles spinning once it manages
      // more threads than there are cores), which made this mode 2x slower than a Python loop.
      run_stage(0);
    }
    report_complete_batches();  // those completed at the very end
    RunResult result{book_.losses(), stats_, {}, seconds_since(start)};
    if (options_.pipelined) {
      result.workers = workers_;
      for (WorkerStats& w : result.workers) {
        if (shared()) {
          w.peak_queued_bytes = peak_queued_bytes_;
        } else {
          for (int b = w.first_block; b < w.end_block; ++b) w.busy_s += stats_[b].busy_s;
        }
      }
      for (size_t g = 0; g < queues_.size(); ++g) result.workers[g].peak_queued_bytes = queues_[g]->peak_bytes();
    }
    if (interrupted_) throw Interrupted();
    if (error_) std::rethrow_exception(error_);
    return result;
  }

 private:
  bool shared() const { return options_.shared_workers > 0; }

  std::unique_ptr<StageDevice> make_stage(c10::Device device) const {
    if (device.is_cpu()) return make_cpu_stage(options_.threads_per_stage, options_.hold_back_results);
#ifdef AL_EXT_WITH_CUDA
    if (device.is_cuda()) return make_cuda_stage(device, options_.max_in_flight);
#endif
    throw std::invalid_argument("the scheduler runs stages on the CPU or on CUDA devices, not on " + device.str());
  }

  // A pipeline worker: one stage's loop, on a thread of its own.
  void worker(size_t stage) {
    at::init_num_threads();
    run_stage(stage);
    {
      std::lock_guard<std::mutex> lock(done_mutex_);
      ++finished_;
    }
    done_.notify_all();
  }

  void run_stage(size_t stage) {
    StageDevice& device = *devices_[stage];
    // Destroyed last, on this thread: after leave(), even if it threw (stage_device.h).
    std::unique_ptr<ThreadScope> scope;
    capture_failure(device, [&] {
      scope = device.enter();
      if (shared()) {
        shared_loop(stage, device);
      } else {
        stage_loop(stage, device);
      }
    });
    capture_failure(device, [&] { device.leave(); });
  }

  template <typename F> void capture_failure(StageDevice& device, F&& body) {
    std::optional<BlockError> error;
    try {
      body();
      return;
    } catch (const BlockError& e) {
      error.emplace(e);
    } catch (const Interrupted&) {  // a step saw Ctrl-C (Python's KeyboardInterrupt): stop at once, as asked
      interrupted_ = true;
      stop();
      return;
    } catch (const c10::Error& e) {
      error.emplace(current_block_, current_batch_, device.explain_failure(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      error.emplace(current_block_, current_batch_, device.explain_failure(e.what()));
    }
    // A step enqueued before the failing one may hold a non-finite loss not read yet (CUDA):
    // that failure came first.
    if (std::optional<BlockError> earlier = unread_failure(device); earlier && comes_before(*earlier, *error)) {
      error.emplace(*earlier);
    }
    fail(std::make_exception_ptr(*error));
  }

  // The first non-finite loss among the stage's steps whose results are not read yet.
  std::optional<BlockError> unread_failure(StageDevice& device) {
    try {
      account(device.finished(true));
    } catch (const BlockError& e) {
      return e;
    } catch (const std::exception&) {
      // The device is broken (a CUDA error): what failed first is the error in hand.
    }
    return std::nullopt;
  }

  static bool comes_before(const BlockError& a, const BlockError& b) {
    return a.batch < b.batch || (a.batch == b.batch && a.block < b.block);
  }

  void fail(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(done_mutex_);
      if (!error_) error_ = error;  // the first failure is the one reported
    }
    stop();
  }

  void stop() {
    stopping_ = true;
    for (auto& q : queues_) q->close();
    wake(feed_mutex_, feed_);
    wake(tasks_mutex_, tasks_);
  }

  // Wakes the waiters of `cv`, which test their condition under `mutex`: taking it orders this
  // wake after a waiter's test, so that no wake falls between its test and its wait.
  static void wake(std::mutex& mutex, std::condition_variable& cv) {
    { std::lock_guard<std::mutex> lock(mutex); }
    cv.notify_all();
  }

  // On the calling thread. A failing `interrupted` ends the run like a failing on_batch:
  // its exception is rethrown once every worker has stopped.
  bool interrupted_now() {
    if (!options_.interrupted || interrupted_ || reporting_failed_) return interrupted_;
    try {
      if (options_.interrupted()) {
        interrupted_ = true;
        stop();
      }
    } catch (...) {
      reporting_failed_ = true;
      fail(std::current_exception());
      return true;
    }
    return interrupted_;
  }

  // The calling thread waits here, reporting complete batches as they come and asking now
  // and then whether the user interrupted.
  void wait_for(size_t workers) {
    std::unique_lock<std::mutex> lock(done_mutex_);
    while (finished_ < workers) {
      done_.wait_for(lock, std::chrono::milliseconds(50), [&] { return finished_ == workers || batches_complete_; });
      batches_complete_ = false;
      lock.unlock();
      report_complete_batches();
      if (!interrupted_) interrupted_now();
      lock.lock();
    }
  }

  // On the calling thread: on_batch for each batch completed since the last call.
  void report_complete_batches() {
    for (auto& [batch, losses] : book_.take_complete()) {
      if (options_.on_batch && !reporting_failed_) {
        try {
          if (options_.on_batch(batch, losses)) stop_feeding_ = true;
        } catch (...) {
          reporting_failed_ = true;
          fail(std::current_exception());
        }
      }
      {
        std::lock_guard<std::mutex> lock(feed_mutex_);
        reported_ = batch + 1;
      }
      feed_.notify_all();
    }
    if (shared()) wake(tasks_mutex_, tasks_);  // the first block may pull again, or all is done
  }

  // One block's training step on one batch. `reused`: the buffers that the stage's steps on
  // this batch returned and write again at their next call (StepResult::outputs_reused); this
  // step's are added. `hands_on`: its outputs leave the stage (see owned).
  StepResult step(StageDevice& device, int block, int batch, const at::Tensor& s_prev, const at::Tensor& t_prev,
                  std::vector<at::Tensor>& reused, bool hands_on) {
    current_block_ = block;  // where a failure will be reported
    current_batch_ = batch;
    device.before_step();
    StepResult out = blocks_[block](s_prev, t_prev);
    if (out.outputs_reused) {
      reused.push_back(out.s);
      reused.push_back(out.t);
    }
    if (hands_on) {
      // Before after_step: on CUDA, the handoff's event then follows the copies too.
      out.s = owned(out.s, reused);
      out.t = owned(out.t, reused);
    }
    device.after_step(block, batch, out);
    account(device.finished(false));
    return out;
  }

  // A handoff must own its memory: the queue may hold it while the stage steps up to
  // max_in_flight more batches, and a reused buffer (or a view of one, passed on by a later
  // step that returns its input) would be written again meanwhile. Within the stage no copy is
  // needed: the next block reads it before the producer's next call, on the same stream.
  static at::Tensor owned(const at::Tensor& x, const std::vector<at::Tensor>& reused) {
    for (const at::Tensor& buffer : reused) {
      if (x.is_alias_of(buffer)) return x.clone();
    }
    return x;
  }

  // Steps whose results are in: their time and losses recorded, a non-finite loss refused.
  void account(const std::vector<StepRecord>& records) {
    for (const StepRecord& r : records) {
      stats_[r.block].busy_s += r.busy_s;
      ++stats_[r.block].batches;
      if (!std::isfinite(r.loss_as) || !std::isfinite(r.loss_ae)) {
        throw BlockError(r.block, r.batch,
                         "non-finite loss (L_as = " + std::to_string(r.loss_as) + ", L_ae = " +
                             std::to_string(r.loss_ae) + "); the block's parameters were not updated",
                         std::isfinite(r.loss_as) ? "L_ae" : "L_as");
      }
      if (book_.record(r.block, r.batch, r.loss_as, r.loss_ae)) {
        {
          std::lock_guard<std::mutex> lock(done_mutex_);
          batches_complete_ = true;
        }
        done_.notify_all();
      }
    }
  }

  // The first stage's next batch, or nullopt at the end of the stream (or of the run).
  std::optional<Batch> next_batch(int index) {
    if (options_.pipelined && options_.max_unreported > 0) {  // the calling thread reports
      std::unique_lock<std::mutex> lock(feed_mutex_);
      feed_.wait(lock, [&] { return index - reported_ < options_.max_unreported || stop_feeding_ || stopping_; });
    }
    return pull_batch();
  }

  std::optional<Batch> pull_batch() {
    if (stop_feeding_ || stopping_) return std::nullopt;
    std::optional<Batch> batch = source_();
    if (batch) book_.add_batch();
    return batch;
  }

  // A shared worker: runs whichever block can step next, the deepest first (that frees queued
  // activations and completes batches soonest), until every batch pulled has trained on every
  // block. A block is never run by two workers at once, so each steps through the batches in
  // order, as in a stage.
  void shared_loop(size_t g, StageDevice& device) {
    WorkerStats& w = workers_[g];
    const int depth = static_cast<int>(blocks_.size());
    std::unique_lock<std::mutex> lock(tasks_mutex_);
    for (;;) {
      int block = -1;
      const auto start = Clock::now();
      tasks_.wait(lock, [&] { return stopping_ || all_done() || (block = next_task()) >= 0; });
      w.wait_s += seconds_since(start);
      if (stopping_ || block < 0) break;
      busy_[block] = 1;
      int batch = pulled_;
      at::Tensor s, t;
      if (block > 0) {
        Handoff in = std::move(inputs_[block].front());
        inputs_[block].pop_front();
        queued_bytes_ -= in.s.nbytes() + in.t.nbytes();
        batch = in.batch;
        s = std::move(in.s);
        t = std::move(in.t);
      }
      lock.unlock();
      bool pulled = block > 0;
      if (block == 0) {
        current_block_ = 0;  // a failing source is reported at the first block
        current_batch_ = batch;
        const auto pull_start = Clock::now();
        if (std::optional<Batch> next = pull_batch()) {
          std::tie(s, t) = std::move(*next);
          pulled = true;
        }
        w.wait_s += seconds_since(pull_start);  // as a stage waits on the source
      }
      StepResult out;
      if (pulled) {
        // The block's own busy time (its step alone, as the stage measured it): this worker
        // holds the block, so nothing else adds to it meanwhile.
        const double block_busy = stats_[block].busy_s;
        std::vector<at::Tensor> reused;
        out = step(device, block, batch, s, t, reused, /*hands_on=*/block + 1 < depth);
        w.busy_s += stats_[block].busy_s - block_busy;
      }
      lock.lock();
      busy_[block] = 0;
      if (block == 0 && pulled) {
        ++pulled_;
      } else if (block == 0) {
        source_ended_ = true;
      }
      if (pulled && block + 1 < depth) {
        queued_bytes_ += out.s.nbytes() + out.t.nbytes();
        peak_queued_bytes_ = std::max(peak_queued_bytes_, queued_bytes_);
        inputs_[block + 1].push_back({batch, std::move(out.s), std::move(out.t), nullptr});
      }
      tasks_.notify_all();
    }
  }

  // Under tasks_mutex_: the deepest block that is free, has a batch to train on and room for
  // its outputs (max_in_flight batches wait for each block at most); -1 if none.
  int next_task() {
    const int depth = static_cast<int>(blocks_.size());
    for (int b = depth - 1; b >= 0; --b) {
      if (busy_[b] || (b + 1 < depth && inputs_[b + 1].size() >= static_cast<size_t>(options_.max_in_flight))) {
        continue;
      }
      if (b > 0 ? !inputs_[b].empty() : may_pull()) return b;
    }
    return -1;
  }

  // Under tasks_mutex_: whether the first block may take the next batch from the source.
  bool may_pull() {
    if (source_ended_ || stop_feeding_ || stopping_) return false;
    if (options_.max_unreported == 0) return true;
    std::lock_guard<std::mutex> lock(feed_mutex_);
    return pulled_ - reported_ < options_.max_unreported;
  }

  // Under tasks_mutex_: no batch will be pulled, and every one pulled has trained on every block.
  bool all_done() {
    if (!(source_ended_ || stop_feeding_)) return false;
    for (size_t b = 0; b < blocks_.size(); ++b) {
      if (busy_[b] || !inputs_[b].empty()) return false;
    }
    return true;
  }

  // Stage g: for each batch in turn, its blocks one after the other.
  void stage_loop(size_t g, StageDevice& device) {
    WorkerStats& w = workers_[g];
    const bool sequential = !options_.pipelined;
    const bool last = g + 1 == workers_.size();
    for (int j = 0; !stopping_; ++j) {
      if (sequential && interrupted_now()) return;
      at::Tensor s, t;
      const auto start = Clock::now();
      if (g == 0) {
        current_block_ = w.first_block;  // a failing source is reported at the first block
        current_batch_ = j;
        std::optional<Batch> batch = next_batch(j);
        w.wait_s += seconds_since(start);
        if (!batch) {
          // The end of the stream. A failure after it (in leave()) is blamed on the stage's last step.
          if (j > 0) {
            current_block_ = w.end_block - 1;
            current_batch_ = j - 1;
          }
          break;
        }
        std::tie(s, t) = std::move(*batch);
      } else {
        std::optional<Handoff> in = queues_[g - 1]->pop();
        w.wait_s += seconds_since(start);
        if (!in) break;  // the end of the stream, or stopped
        j = in->batch;
        s = std::move(in->s);
        t = std::move(in->t);
        device.receive(s, t, in->ready);
      }
      std::vector<at::Tensor> reused;
      for (int b = w.first_block; b < w.end_block; ++b) {
        StepResult out = step(device, b, j, s, t, reused, /*hands_on=*/!last && b + 1 == w.end_block);
        s = std::move(out.s);
        t = std::move(out.t);
      }
      if (!last) {
        const auto push_start = Clock::now();
        const bool handed_on = queues_[g]->push({j, std::move(s), std::move(t), device.ready()});
        w.wait_s += seconds_since(push_start);
        if (!handed_on) return;
      }
      if (sequential) report_complete_batches();  // the calling thread runs this stage
    }
    if (stopping_) return;
    if (!last) queues_[g]->finish();
    account(device.finished(true));
  }

  const std::vector<BlockStep>& blocks_;
  const BatchSource& source_;
  const RunOptions& options_;
  std::vector<BlockStats> stats_;
  std::vector<WorkerStats> workers_;
  std::vector<std::unique_ptr<StageDevice>> devices_;  // one per stage
  LossBook book_;
  std::vector<std::unique_ptr<BoundedQueue>> queues_;
  std::atomic<bool> stopping_{false};       // a failure or an interrupt: every stage stops now
  std::atomic<bool> stop_feeding_{false};   // on_batch asked to stop: the batches pulled still finish
  std::atomic<bool> interrupted_{false};
  bool reporting_failed_ = false;           // on_batch or interrupted threw (calling thread only)
  std::exception_ptr error_;
  std::mutex done_mutex_;
  std::condition_variable done_;
  size_t finished_ = 0;
  bool batches_complete_ = false;           // under done_mutex_: on_batch has news
  std::mutex feed_mutex_;
  std::condition_variable feed_;            // the first stage waits here for reports (max_unreported)
  int reported_ = 0;                        // under feed_mutex_: batches reported to on_batch
  // Shared workers only, under tasks_mutex_ (taken before feed_mutex_, never after).
  std::mutex tasks_mutex_;
  std::condition_variable tasks_;           // idle workers wait here for a block to run
  std::vector<std::deque<Handoff>> inputs_; // per block: the batches handed on by the block below
  std::vector<char> busy_;                  // per block: a worker is running its step
  int pulled_ = 0;                          // batches taken from the source
  bool source_ended_ = false;
  int64_t queued_bytes_ = 0, peak_queued_bytes_ = 0;
  static thread_local int current_block_, current_batch_;  // what this thread is running
};

thread_local int Run::current_block_ = 0;
thread_local int Run::current_batch_ = 0;

}  // namespace

RunResult run(const std::vector<BlockStep>& blocks, const BatchSource& source, const RunOptions& options) {
  if (blocks.empty()) throw std::invalid_argument("blocks must hold at least one block's step");
  if (!source) throw std::invalid_argument("source must be a function that gives the batches");
  if (options.max_in_flight < 1) {
    throw std::invalid_argument("max_in_flight must be at least 1, got " + std::to_string(options.max_in_flight));
  }
  if (!options.stage_starts.empty()) {
    const auto& starts = options.stage_starts;
    bool valid = starts.front() == 0;
    for (size_t g = 1; g < starts.size(); ++g) valid = valid && starts[g] > starts[g - 1];
    if (!valid || starts.back() >= static_cast<int>(blocks.size())) {
      throw std::invalid_argument("stage_starts must rise from 0 and stay below the number of blocks");
    }
  }
  if (options.shared_workers < 0) {
    throw std::invalid_argument("shared_workers must be at least 0, got " + std::to_string(options.shared_workers));
  }
  if (options.shared_workers > 0) {
    if (!options.pipelined) throw std::invalid_argument("shared_workers needs pipelined mode");
    if (!options.stage_starts.empty()) {
      throw std::invalid_argument("shared_workers share every block: stage_starts must be empty");
    }
    if (options.hold_back_results > 0) {
      throw std::invalid_argument("hold_back_results makes CPU stages read results late as CUDA stages do; "
                                  "shared workers run on the CPU only, where results are read at once");
    }
    for (const c10::Device& device : options.stage_devices) {
      if (!device.is_cpu()) {
        throw std::invalid_argument("shared workers run on the CPU (a CUDA stage keeps a stream per group of "
                                    "blocks), got " + device.str());
      }
    }
  }
  if (!options.stage_devices.empty()) {
    const size_t stages = !options.pipelined          ? 1
                          : options.shared_workers > 0 ? static_cast<size_t>(options.shared_workers)
                          : options.stage_starts.empty() ? blocks.size()
                                                         : options.stage_starts.size();
    if (options.stage_devices.size() != stages) {
      throw std::invalid_argument("stage_devices must name one device per stage (" + std::to_string(stages) +
                                  "), got " + std::to_string(options.stage_devices.size()));
    }
  }
  if (options.max_unreported < 0) {
    throw std::invalid_argument("max_unreported must be at least 0, got " + std::to_string(options.max_unreported));
  }
  if (options.hold_back_results < 0) {
    throw std::invalid_argument("hold_back_results must be at least 0, got " +
                                std::to_string(options.hold_back_results));
  }
  if (options.threads_per_stage < 1) {
    throw std::invalid_argument("threads_per_stage must be at least 1, got " +
                                std::to_string(options.threads_per_stage));
  }
  return Run(blocks, source, options).execute();
}

}  // namespace al_ext::scheduler
