// The al_ext._C Python module. Loading it registers the ops (static initialisers in
// registration.cpp). The module itself holds the build information and the scheduler:
// the plans, the stages and the executor that runs them.
#include <torch/extension.h>

#ifdef AL_EXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "../cuda/delay.cuh"
#include "../cuda/glue.h"
#endif
#include "../cpu/onednn_gemm.h"
#include "../scheduler/executor.h"
#include "../scheduler/plan.h"
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

py::list plan_to_python(const Plan& plan) {
  py::list ticks;
  for (const auto& tick : plan) {
    py::list tasks;
    for (const Task& t : tick) tasks.append(py::make_tuple(t.block, t.batch));
    ticks.append(tasks);
  }
  return ticks;
}

// Any Python callable (s_prev, t_prev) -> (s, t, loss_as, loss_ae); it runs with the GIL,
// which the executor's workers otherwise do not hold.
PyBlockStep python_block_step(py::function fn) {
  auto shared = std::make_shared<py::function>(std::move(fn));
  return {[shared](const at::Tensor& s_prev, const at::Tensor& t_prev) {
    py::gil_scoped_acquire gil;
    try {
      py::tuple out = (*shared)(s_prev, t_prev);
      if (out.size() != 4) throw std::runtime_error("a block step must return (s, t, loss_as, loss_ae)");
      return StepResult{out[0].cast<at::Tensor>(), out[1].cast<at::Tensor>(), out[2].cast<at::Tensor>(),
                        out[3].cast<at::Tensor>()};
    } catch (py::error_already_set& e) {
      throw std::runtime_error(e.what());  // the message, taken while the GIL is held
    }
  }};
}

py::dict run_blocks(const std::vector<PyBlockStep>& block_steps, const std::vector<std::pair<at::Tensor, at::Tensor>>& batches,
                    bool pipelined, std::vector<int> stage_starts, int max_in_flight, int threads_per_stage,
                    const std::vector<std::string>& stage_devices, int hold_back_results) {
  std::vector<BlockStep> steps;
  for (const PyBlockStep& b : block_steps) steps.push_back(b.step);
  RunOptions options;
  options.pipelined = pipelined;
  options.stage_starts = std::move(stage_starts);
  options.max_in_flight = max_in_flight;
  options.threads_per_stage = threads_per_stage;
  options.hold_back_results = hold_back_results;
  for (const std::string& device : stage_devices) options.stage_devices.emplace_back(device);
  options.interrupted = [] {
    py::gil_scoped_acquire gil;
    return PyErr_CheckSignals() != 0;  // leaves KeyboardInterrupt set for the caller
  };
  py::dict result;
  try {
    RunResult run_result;
    {
      py::gil_scoped_release release;
      run_result = run(steps, batches, options);
    }
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
      d["wait_s"] = w.wait_s;
      d["peak_queued_bytes"] = w.peak_queued_bytes;
      d["peak_device_bytes"] = w.peak_device_bytes;
      workers.append(d);
    }
    result["losses"] = run_result.losses;
    result["blocks"] = blocks;
    result["stages"] = workers;
    result["wall_s"] = run_result.wall_s;
  } catch (const Interrupted&) {
    throw py::error_already_set();
  } catch (const BlockError& e) {
    result["error"] = py::make_tuple(e.block, e.batch, e.what());
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
    return info;
  }, "How this extension was built: the torch version it was compiled against, whether it has CUDA kernels, "
     "and the library of the fused CPU step's float32 GEMMs ('onednn', or 'aten' where torch lacks oneDNN).");

  m.def("pipeline_plan", [](int blocks, int batches) { return plan_to_python(pipeline_plan(blocks, batches)); },
        "Per tick, the (block, batch) pairs that run when every block works at once.");
  m.def("sequential_plan", [](int blocks, int batches) { return plan_to_python(sequential_plan(blocks, batches)); },
        "Per tick, the (block, batch) pair of the batch-by-batch, block-by-block loop.");

  py::class_<PyBlockStep>(m, "BlockStep", "One block's training step, runnable by the executor.");
  m.def("python_block_step", &python_block_step, py::arg("step"));
  m.def("fused_adam_block_step",
        [](std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avg, std::vector<at::Tensor> exp_avg_sq,
           std::vector<at::Tensor> steps, double lr_fb, double lr_gh, double beta1, double beta2, double eps,
           std::string x_activation, std::string h_activation, std::string variant, std::string ae_loss,
           std::optional<at::Tensor> step_count) {
          DenseBlockSpec spec{std::move(params), x_activation, h_activation, variant, ae_loss, lr_fb, lr_gh};
          return PyBlockStep{fused_adam_block_step(std::move(spec), std::move(exp_avg), std::move(exp_avg_sq),
                                                   std::move(steps), beta1, beta2, eps,
                                                   step_count.value_or(at::Tensor()))};
        }, py::arg("params"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("steps"), py::arg("lr_fb"),
        py::arg("lr_gh"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("x_activation"),
        py::arg("h_activation"), py::arg("variant"), py::arg("ae_loss"), py::arg("step_count") = py::none(),
        "A fused Adam block step; with step_count, the step number is read and advanced there, on the "
        "parameters' device, and `steps` are left alone.");
  m.def("fused_sgd_block_step",
        [](std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffer, double lr_fb, double lr_gh,
           double momentum, std::string x_activation, std::string h_activation, std::string variant,
           std::string ae_loss) {
          DenseBlockSpec spec{std::move(params), x_activation, h_activation, variant, ae_loss, lr_fb, lr_gh};
          return PyBlockStep{fused_sgd_block_step(std::move(spec), std::move(momentum_buffer), momentum)};
        });
  m.def("balanced_groups", &balanced_groups, py::arg("costs"), py::arg("workers"),
        "First block of each group of consecutive blocks, balanced so that the costliest group is cheapest.");
  m.def("run_blocks", &run_blocks, py::arg("blocks"), py::arg("batches"), py::arg("pipelined"),
        py::arg("stage_starts"), py::arg("max_in_flight"), py::arg("threads_per_stage"), py::arg("stage_devices"),
        py::arg("hold_back_results") = 0,
        "Trains every block on every batch, pipelined (stages of consecutive blocks, each on its own thread, and "
        "on CUDA its own stream) or sequentially. Returns {'losses', 'blocks', 'stages', 'wall_s'}, or "
        "{'error': (block, batch, message)} if a block failed. hold_back_results (tests): CPU stages read each "
        "step's results that many batches late, as a CUDA stage's stream running behind makes them.");
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
