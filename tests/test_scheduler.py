"""The C++ scheduler: stage balancing, shared workers, the order every block sees the batches
in, pipelined training equal to sequential training, streaming, and faults."""
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import al_ext
from al_ext import Pipeline, PipelineError, Trainer
from al_ext._extension import _C

from conftest import small_mlp

ROOT = Path(__file__).resolve().parent.parent


def run_cpp_unit_test(tmp_path, sources: list[str], with_torch: bool = False) -> str:
    """Builds tests/cpp's test from `sources` (from the repository root) and runs it: its output."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    flags = []
    if with_torch:  # ATen's headers, and torch's libraries linked where they lie
        lib = Path(torch.__file__).parent / "lib"
        flags = [*(f"-I{p}" for p in include_paths()), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
                 f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    binary = tmp_path / "test"
    subprocess.run([compiler, "-std=c++20", "-O1", *(ROOT / s for s in sources), "-o", binary, *flags], check=True,
                   timeout=300)
    result = subprocess.run([binary], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_balance_cpp_unit_tests(tmp_path):
    out = run_cpp_unit_test(tmp_path, ["tests/cpp/test_balance.cpp", "csrc/scheduler/balance.cpp"])
    assert "balance tests passed" in out


def test_stage_state_is_restored_on_its_own_thread_and_a_failing_leave_is_reported(tmp_path):
    """tests/cpp/test_stage_scope.cpp: the executor with a stage device that, like a CUDA
    stage, sets a per-thread current stream and may throw as it leaves."""
    out = run_cpp_unit_test(tmp_path, ["tests/cpp/test_stage_scope.cpp", "csrc/scheduler/executor.cpp"],
                            with_torch=True)
    assert "stage scope tests passed" in out


# How run_blocks is called in each mode (4 blocks): positional (pipelined, stage_starts), keywords.
MODES = {"sequential": ((False, []), {}), "stages": ((True, [0, 1, 2, 3]), {}),
         "shared": ((True, []), {"shared_workers": 2})}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_block_sees_every_batch_once_in_order_after_the_block_below(mode):
    ran, running, overlaps, at_once, lock = [], set(), [], [], threading.Lock()

    def make(block):
        def step(s, t):
            with lock:
                ran.append((block, int(s[0])))
                overlaps.append(block in running)
                running.add(block)
                at_once.append(len(running))
            time.sleep(0.001 * (block + 1))  # unequal blocks: the shared workers move between them
            with lock:
                running.discard(block)
            return s, t, torch.tensor(0.0), torch.tensor(0.0)
        return _C.python_block_step(step)

    blocks, batches = 4, 25
    stream = ((torch.tensor([float(j)]), torch.zeros(1)) for j in range(batches))
    (pipelined, starts), options = MODES[mode]
    out = _C.run_blocks([make(b) for b in range(blocks)], stream, pipelined, starts, 2, 1, [], **options)
    assert out["losses"].shape == (batches, blocks, 2)
    assert not any(overlaps), "a block steps on one batch at a time"
    workers = {"sequential": 1, "stages": blocks, "shared": 2}[mode]
    assert max(at_once) <= workers and (max(at_once) > 1) == (workers > 1), "the workers run blocks at once"
    for b in range(blocks):
        assert [j for block, j in ran if block == b] == list(range(batches))
    position = {task: i for i, task in enumerate(ran)}
    assert all(position[(b - 1, j)] < position[(b, j)] for b in range(1, blocks) for j in range(batches))


def data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def trained_parameters(pipeline, backend, variant="A", optimizer="adam", epochs=2, **kwargs):
    model = small_mlp(hidden=(24, 16, 12), variant=variant, backend=backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same intra-op thread count as each pipeline stage: same GEMM rounding
    try:
        trainer = Trainer(model, batch_size=16, progress=False, optimizer=optimizer, pipeline=pipeline,
                          threads_per_stage=1 if pipeline else None, pipeline_stages=3 if pipeline else None,
                          **kwargs)
        history = trainer.fit(data(), epochs=epochs)
    finally:
        torch.set_num_threads(threads)
    return [p.detach().clone() for p in model.parameters()], history


@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("variant,optimizer", [("A", "adam"), ("B", "adam"), ("A", "sgd")])
def test_pipelined_training_equals_sequential_bit_for_bit(backend, variant, optimizer, shared):
    sequential, _ = trained_parameters(False, backend, variant, optimizer)
    pipelined, history = trained_parameters(True, backend, variant, optimizer, max_in_flight=1,
                                            pipeline_shared=shared)
    assert all(torch.equal(a, b) for a, b in zip(sequential, pipelined))
    assert len(history[-1]["stage_idle_fraction"]) == 3, "one worker per block"


@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
def test_cpp_sequential_mode_equals_pipelined_mode(shared):
    results = []
    for pipelined in (False, True):
        model = small_mlp(hidden=(24, 16, 12))
        opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
        run = Pipeline(model, opts, pipelined=pipelined, threads_per_stage=1, stages=2, shared=shared).run(
            [(x[i : i + 8], y[i : i + 8]) for x, y in [data()] for i in range(0, 96, 8)])
        results.append(([p.detach().clone() for p in model.parameters()], run))
    (seq_params, seq_run), (pipe_params, pipe_run) = results
    assert all(torch.equal(a, b) for a, b in zip(seq_params, pipe_params))
    assert torch.equal(seq_run.losses, pipe_run.losses) and pipe_run.losses.shape == (12, 3, 2)
    for block in pipe_run.blocks:
        assert block["batches"] == 12 and block["busy_s"] > 0
    assert len(pipe_run.stages) == 2
    for stage in pipe_run.stages:
        assert 0.0 <= stage["idle_fraction"] <= 1.0 and stage["device"] == "cpu"
        assert stage["blocks"] == (0, 3) if shared else stage["blocks"] != (0, 3)
    busy = sum(s["busy_s"] for s in pipe_run.stages)
    assert busy == pytest.approx(sum(b["busy_s"] for b in pipe_run.blocks), rel=0.05), "each step counted once"
    assert seq_run.stages == [] and seq_run.devices == pipe_run.devices == [], "device peaks are CUDA's"


def worker_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
def test_a_failing_block_reports_where_and_a_later_run_works(shared):
    model = small_mlp(hidden=(24, 16, 12), backend="reference")
    trainer = Trainer(model, batch_size=8, progress=False, pipeline=True)
    pipeline = Pipeline(model, trainer.optimizers, shared=shared)
    original = model.blocks[1].b
    calls = {"n": 0}

    class Fails(torch.nn.Module):
        def forward(self, s):
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("boom in the bridge")
            return original(s)

    model.blocks[1].b = Fails()
    before = worker_threads()
    with pytest.raises(PipelineError, match="block 2 failed on batch 3: .*boom in the bridge") as err:
        pipeline.run([(x[i : i + 8], y[i : i + 8]) for x, y in [data()] for i in range(0, 96, 8)])
    assert (err.value.block, err.value.batch) == (2, 3)
    assert worker_threads() == before, "every worker thread is joined"
    model.blocks[1].b = original
    assert len(trainer.fit(data(), epochs=1)) == 1


def test_non_finite_loss_in_a_fused_block_stops_the_run():
    model = small_mlp(hidden=(24, 16, 12))
    trainer = Trainer(model, batch_size=8, progress=False, pipeline=True, label_warmup=False)
    with torch.no_grad():
        model.blocks[2].g[0].weight[0, 0] = float("nan")
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss L_as in block 3, batch 0, epoch 1") as err:
        trainer.fit(data(), epochs=1)
    assert (err.value.block, err.value.batch, err.value.epoch, err.value.loss) == (3, 0, 1, "L_as")


@pytest.mark.parametrize("shared", [False, True], ids=["stages", "shared"])
def test_ctrl_c_stops_every_block_and_a_later_run_works(shared):
    model = small_mlp(hidden=(24, 16, 12), backend="reference")
    x, y = data(4096)
    pipeline = Pipeline(model, Trainer(model, progress=False).optimizers, shared=shared)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    before = worker_threads()
    timer.start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run([(x[i : i + 4], y[i : i + 4]) for i in range(0, 4096, 4)])
    timer.join()
    assert time.perf_counter() - start < 10, "the run stops soon after Ctrl-C"
    assert worker_threads() == before
    assert pipeline.run([(x[:4], y[:4])]).losses.shape == (1, 3, 2)


def test_queues_hold_at_most_max_in_flight_batches():
    model = small_mlp(hidden=(24, 16, 12))
    opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
    x, y = data(256)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 256, 8)]
    handoff = [8 * (24 + 12) * 4, 8 * (16 + 12) * 4]  # bytes of (s, t) leaving blocks 1 and 2
    for limit in (1, 3):
        run = Pipeline(model, opts, max_in_flight=limit, stages=3, shared=False).run(batches)
        for stage, size in zip(run.stages, handoff):
            assert 0 < stage["peak_queued_bytes"] <= limit * size
        run = Pipeline(model, opts, max_in_flight=limit, stages=3, shared=True).run(batches)
        assert all(0 < stage["peak_queued_bytes"] <= limit * sum(handoff) for stage in run.stages)


def test_stages_group_consecutive_blocks_by_measured_cost():
    assert _C.balanced_groups([1.0, 1.0, 1.0, 1.0], 2) == [0, 2]
    assert _C.balanced_groups([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1]
    model = small_mlp(hidden=(24, 16, 12, 8))
    pipeline = Pipeline(model, [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks], stages=2,
                        shared=False)
    x, y = data(64)
    run = pipeline.run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)])
    assert [s["blocks"] for s in run.stages][0][0] == 0 and run.stages[-1]["blocks"][1] == 4
    assert len(run.stages) == 2
    assert pipeline.block_costs == [b["busy_s"] for b in run.blocks], "the next run is balanced by measured time"


def test_bad_pipeline_arguments():
    model = small_mlp()
    opts = Trainer(model, progress=False).optimizers
    with pytest.raises(ValueError, match="max_in_flight must be a positive integer"):
        Pipeline(model, opts, max_in_flight=0)
    with pytest.raises(ValueError, match="one fused optimiser per block"):
        Pipeline(model, opts[:1])
    with pytest.raises(TypeError, match="model must be an AssociatedLearning"):
        Pipeline(torch.nn.Linear(2, 2), opts)
    with pytest.raises(ValueError, match="pipeline=True trains the blocks"):
        Trainer(al_ext.bp_baseline(model), pipeline=True)
    with pytest.raises(ValueError, match="cuda_graphs=True replays fused block steps on CUDA"):
        Pipeline(model, opts, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True .* needs pipeline=True"):
        Trainer(model, progress=False, cuda_graphs=True)
    with pytest.raises(TypeError, match="shared must be True, False or None .* got 'no'"):
        Pipeline(model, opts, shared="no")
    assert not Trainer(model, progress=False, pipeline=True, pipeline_shared=False).pipeline.shared
    assert Trainer(model, progress=False, pipeline=True).pipeline.shared, "the CPU's default"


@pytest.mark.parametrize("pipelined,options,message", [
    (False, dict(shared_workers=2), "shared_workers needs pipelined mode"),
    (True, dict(shared_workers=-1), "shared_workers must be at least 0, got -1"),
    (True, dict(shared_workers=2, hold_back_results=1), "shared workers run on the CPU only"),
])
def test_bad_shared_worker_options(pipelined, options, message):
    step = _C.python_block_step(lambda s, t: (s, t, torch.tensor(0.0), torch.tensor(0.0)))
    with pytest.raises(ValueError, match=message):
        _C.run_blocks([step, step], [(torch.zeros(1), torch.zeros(1))], pipelined, [], 2, 1, [], **options)
    with pytest.raises(ValueError, match="stage_starts must be empty"):
        _C.run_blocks([step, step], [], True, [0, 1], 2, 1, [], shared_workers=2)
    with pytest.raises(ValueError, match="shared workers run on the CPU .* got cuda:0"):
        _C.run_blocks([step, step], [], True, [], 2, 1, ["cuda:0"], shared_workers=1)


def test_a_run_after_the_blocks_moved_is_refused():
    model = small_mlp()
    pipeline = Pipeline(model, Trainer(model, progress=False).optimizers)
    model.blocks[1].to("meta")
    with pytest.raises(ValueError, match="the model's blocks moved since this Pipeline was made .*make a new Pipeline"):
        pipeline.run([(torch.rand(4, 20), torch.randint(0, 5, (4,)))])


def test_adam_steps_counted_in_a_tensor_train_as_with_the_host_count():
    """The scheduler's Adam step with step_count (what a CUDA graph replays; here on the CPU):
    the same parameters bit for bit, the count advanced once per batch, the host counters
    left for scheduler_run_done() to set."""
    results = []
    for counted in (False, True):
        model = small_mlp(hidden=(24, 16, 12))
        opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
        steps = []
        for opt in opts:
            params, exp_avg, exp_avg_sq, counters = opt._state_lists()
            count = torch.zeros((), dtype=torch.float64) if counted else None
            steps.append((_C.fused_adam_block_step([p.detach() for p in params], exp_avg, exp_avg_sq, counters, 1e-3,
                                                   2e-3, 0.9, 0.999, 1e-8, *opt._config(), step_count=count),
                          count, counters))
        x, y = data()
        batches = [(model.check_input(x[i : i + 8]), model.label_targets(y[i : i + 8])) for i in range(0, 96, 8)]
        with torch.no_grad():
            out = _C.run_blocks([step for step, _, _ in steps], batches, True, [0, 1, 2], 2, 1, [])
        assert "error" not in out
        for _, count, counters in steps:
            if counted:
                assert float(count) == 12 and all(float(c) == 0 for c in counters)
            else:
                assert all(float(c) == 12 for c in counters)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("mode", ["stages", "shared"])
def test_random_streams_stops_limits_and_failures_end_with_every_block_in_order(mode):
    """100 runs of random depth, length, workers, limits, stops and failing steps: every run
    ends; without a failure every block trained on the same batches in order and each was
    reported once, in order; with one, the failing step is the one reported."""
    rng = random.Random(0)

    def traced(depth, fail_at, log):
        def make(block):
            def step(s, t):
                log.append((block, int(s[0])))
                time.sleep(random.random() * 0.0005)  # not rng: the runs' timing must not change their draws
                if (block, int(s[0])) == fail_at:
                    raise RuntimeError("boom")
                return s, t, torch.tensor(0.0), torch.tensor(0.0)
            return _C.python_block_step(step)
        return [make(b) for b in range(depth)]

    for _ in range(100):
        depth, n, workers = rng.randint(1, 5), rng.randint(0, 30), rng.randint(1, 4)
        stop_at = rng.choice([None, None, rng.randint(0, 30)])
        fail_at = rng.choice([None, None, None, (rng.randrange(depth), rng.randint(0, 30))])
        log, reported = [], []

        def on_batch(index, losses):
            reported.append(index)
            return stop_at is not None and index >= stop_at

        stream = ((torch.tensor([float(j)]), torch.zeros(1)) for j in range(n))
        layout = ([], {"shared_workers": workers}) if mode == "shared" else (list(range(depth)), {})
        out = _C.run_blocks(traced(depth, fail_at, log), stream, True, layout[0], rng.randint(1, 3), 1, [],
                            on_batch=on_batch, max_unreported=rng.choice([0, 0, 1, 2, 5]), **layout[1])
        if "error" in out:
            assert fail_at is not None and out["error"][:2] == fail_at
            continue
        trained = len(out["losses"])
        assert reported == list(range(trained)) and (stop_at is not None or trained == n)
        assert all([j for b, j in log if b == block] == list(range(trained)) for block in range(depth))
