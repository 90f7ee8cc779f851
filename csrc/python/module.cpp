// The al_ext._C Python module. Loading it registers the ops (static initialisers in
// registration.cpp). The module itself holds the build information and the scheduler:
// the stage balancing, the block steps and the executor that runs them.
#include <torch/extension.h>

#ifdef AL_EXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "../cuda/delay.cuh"
#include "../cuda/glue.h"
#endif
#include "../cpu/large_buffer_cache.h"
#include "../cpu/onednn_gemm.h"
#include "../scheduler/executor.h"
#include "../scheduler/balance.h"
#include "../scheduler/block_steps.h"

#ifndef AL_EXT_TORCH_VERSION
#error "AL_EXT_TORCH_VERSION must be set by the build (the torch version compiled against)"
#endif

namespace py = pybind11;
using namespace al_ext::scheduler;

namespace {

// A block's training step, as Python holds it.
struct PyBlockStep {
  BlockStep step;
};

// A Python callable () -> (lr_fb, lr_gh), called on a stage's thread with the GIL.
NextLearningRates python_learning_rates(std::optional<py::function> fn) {
  if (!fn) return {};
  auto shared = std::make_shared<py::function>(std::move(*fn));
  return [shared] {
    py::gil_scoped_acquire gil;
    try {
      return (*shared)().cast<std::pair<double, double>>();
    } catch (py::error_already_set& e) {
      if (e.matches(PyExc_KeyboardInterrupt)) throw Interrupted();  // Ctrl-C, not a failure
      throw std::runtime_error(std::string("the learning-rate schedule failed: ") + e.what());
    }
  };
}

// Any Python callable (s_prev, t_prev) -> (s, t, loss_as, loss_ae); it runs with the GIL,
// which the executor's workers otherwise do not hold. `reuses_outputs`: it writes s and t into
// the same buffers at every call, as a CUDA graph's replay does (StepResult::outputs_reused).
PyBlockStep python_block_step(py::function fn, bool reuses_outputs) {
  auto shared = std::make_shared<py::function>(std::move(fn));
  return {[shared, reuses_outputs](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    py::gil_scoped_acquire gil;
    try {
      py::tuple out = (*shared)(s_prev, t_prev);
      if (out.size() != 4) throw std::runtime_error("a block step must return (s, t, loss_as, loss_ae)");
      return StepResult{out[0].cast<at::Tensor>(), out[1].cast<at::Tensor>(), out[2].cast<at::Tensor>(),
                        out[3].cast<at::Tensor>(), reuses_outputs};
    } catch (py::error_already_set& e) {
      if (e.matches(PyExc_KeyboardInterrupt)) throw Interrupted();  // Ctrl-C, not a failure of the block
      throw std::runtime_error(e.what());  // the message, taken while the GIL is held
    }
  }};
}

// The batches of a Python iterable, pulled by one thread at a time. An exception from
// the iterable ends the stream (the batches already pulled still train) and is kept to be
// raised once the run is over.
class PythonBatchSource {
 public:
  explicit PythonBatchSource(const py::iterable& batches)
      : iterator_(std::make_shared<py::object>(py::iter(batches))) {}

  std::optional<Batch> operator()() {
    py::gil_scoped_acquire gil;
    try {
      // Not py::iterator, which reads one item ahead: a batch is pulled only when it is trained.
      auto item = py::reinterpret_steal<py::object>(PyIter_Next(iterator_->ptr()));
      if (!item) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return std::nullopt;
      }
      auto pair = item.cast<py::tuple>();
      if (pair.size() != 2) throw py::value_error("each batch must be an (s, t) pair of tensors");
      return Batch{pair[0].cast<at::Tensor>(), pair[1].cast<at::Tensor>()};
    } catch (py::error_already_set& e) {
      *error_ = std::make_shared<py::error_already_set>(std::move(e));
    } catch (const py::cast_error& e) {
      PyErr_SetString(PyExc_TypeError, (std::string("each batch must be an (s, t) pair of tensors: ") + e.what()).c_str());
      *error_ = std::make_shared<py::error_already_set>();
    } catch (const py::builtin_exception& e) {
      e.set_error();
      *error_ = std::make_shared<py::error_already_set>();
    }
    return std::nullopt;
  }

  // Raises the iterable's exception, if there was one (with the GIL held).
  void raise_if_failed() const {
    if (*error_) throw **error_;
  }

 private:
  std::shared_ptr<py::object> iterator_;
  std::shared_ptr<std::shared_ptr<py::error_already_set>> error_ = std::make_shared<std::shared_ptr<py::error_already_set>>();
};

py::dict run_blocks(const std::vector<PyBlockStep>& block_steps, const py::iterable& batches, bool pipelined,
                    std::vector<int> stage_starts, int max_in_flight, int threads_per_stage,
                    const std::vector<std::string>& stage_devices, int hold_back_results,
                    const std::optional<py::function>& on_batch, const std::optional<py::function>& should_abort,
                    int max_unreported, int shared_workers) {
  std::vector<BlockStep> steps;
  for (const PyBlockStep& b : block_steps) steps.push_back(b.step);
  RunOptions options;
  options.pipelined = pipelined;
  options.stage_starts = std::move(stage_starts);
  options.max_in_flight = max_in_flight;
  options.threads_per_stage = threads_per_stage;
  options.hold_back_results = hold_back_results;
  options.max_unreported = max_unreported;
  options.shared_workers = shared_workers;
  for (const std::string& device : stage_devices) options.stage_devices.emplace_back(device);
  options.interrupted = [&should_abort] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) return true;  // leaves KeyboardInterrupt set for the caller
    return should_abort && py::cast<bool>(py::bool_((*should_abort)()));
  };
  if (on_batch) {
    options.on_batch = [&on_batch](int batch, const std::vector<double>& losses) {
      py::gil_scoped_acquire gil;
      at::Tensor row = at::tensor(losses, at::kDouble).reshape({-1, 2});
      return py::cast<bool>(py::bool_((*on_batch)(batch, row)));
    };
  }
  PythonBatchSource source(batches);
  py::dict result;
  try {
    RunResult run_result;
    {
      py::gil_scoped_release release;
      run_result = run(steps, source, options);
    }
    source.raise_if_failed();
    py::list blocks, workers;
    for (const BlockStats& b : run_result.blocks) {
      py::dict d;
      d["busy_s"] = b.busy_s;
      d["batches"] = b.batches;
      blocks.append(d);
    }
    for (const WorkerStats& w : run_result.workers) {
      py::dict d;
      d["blocks"] = py::make_tuple(w.first_block, w.end_block);
      d["busy_s"] = w.busy_s;
      d["wait_s"] = w.wait_s;
      d["peak_queued_bytes"] = w.peak_queued_bytes;
      workers.append(d);
    }
    result["losses"] = run_result.losses;
    result["blocks"] = blocks;
    result["stages"] = workers;
    result["wall_s"] = run_result.wall_s;
  } catch (const Interrupted&) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, "the run was stopped");
    throw py::error_already_set();
  } catch (const BlockError& e) {
    py::object loss = e.non_finite_loss.empty() ? py::object(py::none()) : py::object(py::str(e.non_finite_loss));
    result["error"] = py::make_tuple(e.block, e.batch, e.what(), loss);
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "al_ext compiled core: op kernels registered under torch.ops.al_ext, and the block scheduler";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = AL_EXT_TORCH_VERSION;
#ifdef AL_EXT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cpu_gemm"] = al_ext::cpu_gemm_library();
    info["cpu_bf16_gemm"] = al_ext::cpu_has_bf16_gemm();
    return info;
  }, "How this extension was built: the torch version it was compiled against, whether it has CUDA kernels, "
     "the library of the fused CPU step's float32 GEMMs ('onednn', or 'aten' where torch lacks oneDNN), and whether "
     "the CPU multiplies bfloat16 in hardware, which the fused step's compute_dtype=torch.bfloat16 needs.");

  m.def("enable_large_buffer_cache", &al_ext::enable_large_buffer_cache,
        "One more user of the large-buffer cache (installed as torch's CPU allocator on first use): freed CPU "
        "buffers of at least large_buffer_min_bytes are kept for the next request of the same size.");
  m.def("disable_large_buffer_cache", &al_ext::disable_large_buffer_cache,
        "One user fewer; the last one gives every kept buffer back to the system.");
  m.def("set_large_buffer_cache_limit", &al_ext::set_large_buffer_cache_limit, py::arg("max_kept_bytes"),
        "The most bytes the cache keeps at once (0: none).");
  m.def("large_buffer_cache_stats", [] {
    const al_ext::LargeBufferCacheStats s = al_ext::large_buffer_cache_stats();
    py::dict stats;
    stats["users"] = s.users;
    stats["kept_bytes"] = s.kept_bytes;
    stats["lent_bytes"] = s.lent_bytes;
    stats["reused"] = s.reused;
    stats["max_kept_bytes"] = s.max_kept_bytes;
    return stats;
  });
  m.attr("large_buffer_min_bytes") = al_ext::kLargeBufferMinBytes;

  py::class_<PyBlockStep>(m, "BlockStep", "One block's training step, runnable by the executor.");
  m.def("python_block_step", &python_block_step, py::arg("step"), py::arg("reuses_outputs") = false,
        "A Python callable (s_prev, t_prev) -> (s, t, loss_as, loss_ae) as a block step. reuses_outputs: it "
        "returns the same s and t buffers at every call, written anew (as a CUDA graph's replay does), so the "
        "executor copies them where they leave the stage.");
  m.def("fused_adam_block_step",
        [](std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq,
           std::vector<at::Tensor> steps, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
           std::string x_activation, std::string h_activation, std::string variant, std::string ae_loss,
           double weight_decay, bool decoupled_weight_decay, std::optional<at::Tensor> step_count,
           std::optional<py::function> next_lrs, std::optional<at::ScalarType> compute_dtype,
           std::vector<at::Tensor> compute_weights) {
          DenseBlockSpec spec{std::move(params), x_activation, h_activation, variant, ae_loss, lr_fb, lr_gh,
                              weight_decay, python_learning_rates(std::move(next_lrs)), compute_dtype,
                              std::move(compute_weights)};
          return PyBlockStep{fused_adam_block_step(std::move(spec), std::move(exp_avg), std::move(exp_avg_sq),
                                                   std::move(steps), beta1, beta2, eps, decoupled_weight_decay,
                                                   step_count.value_or(at::Tensor()))};
        }, py::arg("params"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("steps"), py::arg("lr_fb"),
        py::arg("lr_gh"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("x_activation"),
        py::arg("h_activation"), py::arg("variant"), py::arg("ae_loss"), py::arg("weight_decay") = 0.0,
        py::arg("decoupled_weight_decay") = false, py::arg("step_count") = py::none(), py::arg("next_lrs") = py::none(),
        py::arg("compute_dtype") = py::none(), py::arg("compute_weights") = std::vector<at::Tensor>(),
        "A fused Adam block step; with step_count, the step number is read and advanced there, on the "
        "parameters' device, and `steps` are left alone. next_lrs() -> (lr_fb, lr_gh), called after each step "
        "taken, gives the rates of the next (a schedule stepped by the worker running the block).");
  m.def("fused_sgd_block_step",
        [](std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffer, double lr_fb, double lr_gh,
           double momentum, std::string x_activation, std::string h_activation, std::string variant,
           std::string ae_loss, double weight_decay, std::optional<py::function> next_lrs,
           std::optional<at::ScalarType> compute_dtype, std::vector<at::Tensor> compute_weights) {
          DenseBlockSpec spec{std::move(params), x_activation, h_activation, variant, ae_loss, lr_fb, lr_gh,
                              weight_decay, python_learning_rates(std::move(next_lrs)), compute_dtype,
                              std::move(compute_weights)};
          return PyBlockStep{fused_sgd_block_step(std::move(spec), std::move(momentum_buffer), momentum)};
        }, py::arg("params"), py::arg("momentum_buffer"), py::arg("lr_fb"), py::arg("lr_gh"), py::arg("momentum"),
        py::arg("x_activation"), py::arg("h_activation"), py::arg("variant"), py::arg("ae_loss"),
        py::arg("weight_decay") = 0.0, py::arg("next_lrs") = py::none(), py::arg("compute_dtype") = py::none(),
        py::arg("compute_weights") = std::vector<at::Tensor>(),
        "A fused SGD (momentum) block step; next_lrs as for fused_adam_block_step.");
  m.def("balanced_groups", &balanced_groups, py::arg("costs"), py::arg("workers"),
        "First block of each group of consecutive blocks, balanced so that the costliest group is cheapest.");
  m.def("run_blocks", &run_blocks, py::arg("blocks"), py::arg("batches"), py::arg("pipelined"),
        py::arg("stage_starts"), py::arg("max_in_flight"), py::arg("threads_per_stage"), py::arg("stage_devices"),
        py::arg("hold_back_results") = 0, py::arg("on_batch") = py::none(), py::arg("should_abort") = py::none(),
        py::arg("max_unreported") = 0, py::arg("shared_workers") = 0,
        "Trains every block on every (s_0, t_0) batch of an iterable, pulled lazily, pipelined (stages of "
        "consecutive blocks, each on its own thread, and on CUDA its own stream; or, shared_workers > 0 on the "
        "CPU, that many threads each running whichever block can step next) or sequentially. "
        "on_batch(batch, losses (blocks, 2)) is called on this thread in batch order as each batch completes; "
        "a true result stops the run once the batches already pulled have trained; with max_unreported > 0 "
        "(pipelined), batch j is pulled only once batch j - max_unreported was reported. should_abort() is "
        "polled; true stops it at once (KeyboardInterrupt). Returns {'losses', 'blocks', 'stages', 'wall_s'}, or "
        "{'error': (block, batch, message, non_finite_loss)} if a block failed. An exception from the iterable "
        "or from on_batch is raised. hold_back_results (tests): CPU stages read each step's results that many "
        "batches late, as a CUDA stage's stream running behind makes them.");
#ifdef AL_EXT_WITH_CUDA
  m.def("cuda_graph_block_step", [](const PyBlockStep& step) { return PyBlockStep{cuda_graph_block_step(step.step)}; },
        py::arg("step"),
        "The step replayed from a CUDA graph after its first call: for fused update steps whose state stays on "
        "the device (Adam with step_count).");
  m.def("delay_current_stream", [](int64_t microseconds) {
          al_ext::check_launch(al_ext::cuda::launch_delay(microseconds * 1000, c10::cuda::getCurrentCUDAStream()),
                               "al_ext._C.delay_current_stream", "the delay kernel");
        }, py::arg("microseconds"),
        "Holds the current CUDA stream for about this long (tests: a late producer makes a missing wait show).");
  m.def("delayed_block_step", [](const PyBlockStep& step, int64_t microseconds) {
          return PyBlockStep{[inner = step.step, microseconds](const at::Tensor& s_prev, const at::Tensor& t_prev) {
            al_ext::check_launch(al_ext::cuda::launch_delay(microseconds * 1000, c10::cuda::getCurrentCUDAStream()),
                                 "al_ext._C.delayed_block_step", "the delay kernel");
            return inner(s_prev, t_prev);
          }};
        }, py::arg("step"), py::arg("microseconds"),
        "The step, after holding the current CUDA stream for about this long; inside a CUDA graph when "
        "graphed (tests: a late producer on the fused and graph paths).");
#endif
}
