"""The pipeline on CUDA: one stream per stage, events at the handoffs. These tests skip,
saying why, where there is no GPU; the argument checks at the end run everywhere."""
import functools
import subprocess
import sys

import pytest
import torch

import al_ext
from al_ext import Pipeline, Trainer
from al_ext._extension import _C

from conftest import CUDA_REASON, HAS_CUDA, small_mlp

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
needs_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                    reason="needs two CUDA devices visible to torch")


def data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def trained_on_cuda(pipeline, backend, variant="A", optimizer="adam", **kwargs):
    model = small_mlp(hidden=(24, 16, 12), variant=variant, backend=backend)
    trainer = Trainer(model, batch_size=16, progress=False, optimizer=optimizer, device="cuda", pipeline=pipeline,
                      **kwargs)
    history = trainer.fit(data(), epochs=2)
    torch.cuda.synchronize()
    return [p.detach().cpu() for p in model.parameters()], history


@needs_cuda
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("variant,optimizer", [("A", "adam"), ("B", "adam"), ("A", "sgd")])
def test_pipelined_training_on_streams_equals_the_sequential_loop(backend, variant, optimizer):
    sequential, seq_history = trained_on_cuda(False, backend, variant, optimizer)
    pipelined, history = trained_on_cuda(True, backend, variant, optimizer, max_in_flight=1)
    for a, b in zip(sequential, pipelined):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert history[-1]["loss_as"] == pytest.approx(seq_history[-1]["loss_as"], rel=1e-5)
    assert len(history[-1]["stage_idle_fraction"]) == 3, "one stage, so one stream, per block"


@needs_cuda
def test_cpp_sequential_mode_on_one_stream_equals_pipelined_streams():
    runs = []
    for pipelined in (False, True):
        model = small_mlp(hidden=(24, 16, 12), backend="fused").cuda()
        opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
        x, y = data()
        run = Pipeline(model, opts, pipelined=pipelined).run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)])
        torch.cuda.synchronize()
        runs.append(([p.detach().cpu() for p in model.parameters()], run))
    (seq_params, seq_run), (pipe_params, pipe_run) = runs
    for a, b in zip(seq_params, pipe_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq_run.losses, pipe_run.losses, rtol=1e-5, atol=1e-7)
    assert all(b["batches"] == 12 and b["busy_s"] > 0 for b in pipe_run.blocks)
    assert len(pipe_run.stages) == 3 and all(0 <= s["idle_fraction"] <= 1 for s in pipe_run.stages)
    assert [s["device"] for s in pipe_run.stages] == ["cuda:0"] * 3
    (device,) = pipe_run.devices  # one device shared by the three stages: one peak, the device's
    assert (device["device"], device["blocks"], device["stages"]) == ("cuda:0", [0, 1, 2], [0, 1, 2])
    assert device["peak_allocated_bytes"] == torch.cuda.max_memory_allocated(0)
    parameters = sum(p.numel() * p.element_size() for p in runs[1][0])
    assert device["peak_allocated_bytes"] > 3 * parameters, "the parameters, Adam's two moments, the activations"
    (seq_device,) = seq_run.devices
    assert (seq_device["blocks"], seq_device["stages"]) == ([0, 1, 2], []), "one stage, not reported as stages"


@needs_cuda
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("pipelined", [True, False], ids=["streams", "one-stream"])
def test_cuda_graphs_train_as_eager_steps(optimizer, pipelined):
    """Each block's step replayed from a graph from its second batch on, the short last batch
    run eagerly, over two runs (the second captures anew): the eager run's parameters,
    losses and Adam step counts, on streams and in the one-stream sequential mode."""
    results = []
    for graphs in (False, True):
        model = small_mlp(hidden=(24, 16, 12), backend="fused").cuda()
        make = al_ext.fused.FusedBlockAdam if optimizer == "adam" else al_ext.fused.FusedBlockSGD
        opts = [make(b, 1e-3, 2e-3) for b in model.blocks]
        pipeline = Pipeline(model, opts, pipelined=pipelined, cuda_graphs=graphs)
        x, y = data(100)
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 100, 8)]  # 13 batches, the last of 4
        runs = [pipeline.run(batches) for _ in range(2)]
        torch.cuda.synchronize()
        results.append(([p.detach().cpu() for p in model.parameters()], runs, opts))
    (eager, eager_runs, _), (graphed, graphed_runs, graphed_opts) = results
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_runs, graphed_runs):
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-5, atol=1e-7)
    if optimizer == "adam":
        assert all(float(state["step"]) == 26 for opt in graphed_opts for state in opt.state.values())


@needs_cuda
def test_trainer_with_cuda_graphs_equals_the_sequential_loop():
    sequential, _ = trained_on_cuda(False, "fused")
    graphed, history = trained_on_cuda(True, "fused", cuda_graphs=True)
    for a, b in zip(sequential, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(history[-1]["stage_idle_fraction"]) == 3


def late_producer(delay_us):
    """Block 1 of a two-block run: holds its stream, then writes s = 2 * s_prev. A consumer
    that does not wait for its event reads s before it is written."""
    def step(s_prev, t_prev):
        s = torch.empty_like(s_prev)
        _C.delay_current_stream(delay_us)
        s.copy_(s_prev * 2)
        return s, t_prev.clone(), s_prev.new_zeros(()), s_prev.new_zeros(())
    return step


def recording_consumer(seen):
    def step(s_prev, t_prev):
        seen.append(s_prev.clone())  # on this stage's stream: after the wait, or too early
        return s_prev, t_prev, s_prev.new_zeros(()), s_prev.new_zeros(())
    return step


@needs_cuda
def test_delay_makes_a_missing_wait_read_wrong_data():
    """The race test's premise: without a wait, the consumer reads before the late write."""
    x = torch.randn(64, 256, device="cuda")
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        s = torch.zeros_like(x)
        _C.delay_current_stream(20_000)
        s.copy_(x * 2)
    with torch.cuda.stream(consumer):
        early = s.clone()  # no wait_stream: a race the delay makes certain
    torch.cuda.synchronize()
    assert not torch.equal(early, x * 2)


@needs_cuda
def test_consumer_stream_waits_for_a_late_producer():
    batches = [(torch.randn(64, 256, device="cuda"), torch.randn(64, 10, device="cuda")) for _ in range(6)]
    seen = []
    steps = [_C.python_block_step(late_producer(20_000)), _C.python_block_step(recording_consumer(seen))]
    out = _C.run_blocks(steps, batches, True, [0, 1], 2, 1, ["cuda:0", "cuda:0"])
    torch.cuda.synchronize()
    assert "error" not in out
    for (x, _), got in zip(batches, seen):
        assert torch.equal(got, x * 2)


def late_first_block(opt, monkeypatch, delay_us=20_000):
    """Block 1's fused step holds its stream for delay_us first; graphed, the delay is captured
    with it, so every replay is late too."""
    original = opt.scheduler_step

    def scheduler_step(cuda_graph=False, **options):
        step = _C.delayed_block_step(original(cuda_graph=False, **options), delay_us)
        return _C.cuda_graph_block_step(step) if cuda_graph else step

    monkeypatch.setattr(opt, "scheduler_step", scheduler_step)


@needs_cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["fused", "graphs"])
def test_fused_and_graphed_stages_wait_for_a_late_producer(graphs, monkeypatch):
    """The C++ fused steps (and their graphs) with a late producer: a consumer that did not
    wait for the handoff's event would read s and t before block 1 writes them, so the
    pipelined run would not equal the one-stream run."""
    results = []
    for pipelined in (False, True):
        model = small_mlp(hidden=(256, 256, 256), backend="fused").cuda()
        opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
        late_first_block(opts[0], monkeypatch)
        x, y = data()
        run = Pipeline(model, opts, pipelined=pipelined, cuda_graphs=graphs).run(
            [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)])
        torch.cuda.synchronize()
        results.append(([p.detach().cpu() for p in model.parameters()], run.losses))
    (sequential, sequential_losses), (pipelined, pipelined_losses) = results
    torch.testing.assert_close(sequential_losses, pipelined_losses, rtol=1e-5, atol=1e-7)
    for a, b in zip(sequential, pipelined):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_a_graphed_step_is_captured_once_and_replayed():
    """Python runs only when the step runs eagerly (the warm-up, the capture, a batch of
    another shape); the replays still give each batch its own result."""
    calls = []

    def doubling(s_prev, t_prev):
        calls.append(tuple(s_prev.shape))
        return s_prev * 2, t_prev.clone(), s_prev.new_zeros(()), s_prev.new_zeros(())

    seen = []
    steps = [_C.cuda_graph_block_step(_C.python_block_step(doubling)), _C.python_block_step(recording_consumer(seen))]
    batches = [(torch.randn(64, 256, device="cuda"), torch.randn(64, 10, device="cuda")) for _ in range(6)]
    batches.append((torch.randn(8, 256, device="cuda"), torch.randn(8, 10, device="cuda")))
    out = _C.run_blocks(steps, batches, True, [0, 1], 2, 1, ["cuda:0", "cuda:0"])
    torch.cuda.synchronize()
    assert "error" not in out, out
    assert calls == [(64, 256), (64, 256), (8, 256)], "warm-up, capture, then replays; the short batch eagerly"
    for (x, _), got in zip(batches, seen, strict=True):
        assert torch.equal(got, x * 2)


def pointer_recorder(seen, delay_us=0):
    """Records where s_prev lies and what it holds, on this stage's stream, after holding the
    stream for delay_us (while the block below, on its own stream, steps later batches)."""
    def step(s_prev, t_prev):
        if delay_us:
            _C.delay_current_stream(delay_us)
        seen.append((s_prev.data_ptr(), s_prev.clone()))
        return s_prev, t_prev, s_prev.new_zeros(()), s_prev.new_zeros(())
    return step


def graphed_doubling():
    return _C.cuda_graph_block_step(_C.python_block_step(
        lambda s, t: (s * 2, t.clone(), s.new_zeros(()), s.new_zeros(()))))


def cuda_batches(n=6):
    return [(torch.randn(64, 256, device="cuda"), torch.randn(64, 10, device="cuda")) for _ in range(n)]


@needs_cuda
@pytest.mark.parametrize("pipelined", [True, False], ids=["one-stage", "sequential"])
def test_within_a_stage_a_graphs_outputs_are_read_where_the_replay_wrote_them(pipelined):
    """No copy of s and t between two blocks of one stage: the next block reads the graph's
    static outputs on the same stream, before the next replay writes them again."""
    seen, batches = [], cuda_batches()
    steps = [graphed_doubling(), _C.python_block_step(pointer_recorder(seen))]
    out = _C.run_blocks(steps, batches, pipelined, [0] if pipelined else [], 2, 1, ["cuda:0"])
    torch.cuda.synchronize()
    assert "error" not in out, out
    for (x, _), (_, got) in zip(batches, seen, strict=True):
        assert torch.equal(got, x * 2)
    replayed = {pointer for pointer, _ in seen[1:]}  # batch 0 ran eagerly: the warm-up
    assert len(replayed) == 1, "every replay's s read in place, in the graph's static buffer"


@needs_cuda
def test_a_graphs_outputs_are_copied_where_they_leave_the_stage():
    """The handoff to the next stage copies the graph's outputs (here passed on by a block that
    returns its input): the next stage reads them 20 ms late, when the graph has replayed
    later batches into its buffers."""
    seen, batches = [], cuda_batches()
    passing = _C.python_block_step(lambda s, t: (s, t, s.new_zeros(()), s.new_zeros(())))
    steps = [graphed_doubling(), passing, _C.python_block_step(pointer_recorder(seen, delay_us=20_000))]
    out = _C.run_blocks(steps, batches, True, [0, 2], 2, 1, ["cuda:0", "cuda:0"])
    torch.cuda.synchronize()
    assert "error" not in out, out
    for (x, _), (_, got) in zip(batches, seen, strict=True):
        assert torch.equal(got, x * 2)


@needs_cuda
def test_a_failed_capture_leaves_the_allocator_and_the_stream_usable():
    """A step that fails inside its capture (here: it reads a value back, which a capture
    forbids) fails the run; afterwards this thread allocates and captures as before (the
    allocator no longer routes its allocations through the destroyed graph)."""
    calls = []

    def syncing_on_capture(s_prev, t_prev):
        calls.append(1)
        if len(calls) == 2:
            float(s_prev.sum())
        return s_prev * 2, t_prev, s_prev.new_zeros(()), s_prev.new_zeros(())

    batches = [(torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")) for _ in range(3)]
    step = _C.cuda_graph_block_step(_C.python_block_step(syncing_on_capture))
    out = _C.run_blocks([step], batches, False, [0], 2, 1, ["cuda:0"])
    assert out["error"][:2] == (0, 1), out
    x = torch.randn(512, 512, device="cuda")
    torch.testing.assert_close((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-3, atol=1e-3)
    static = torch.randn(10, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        tripled = static * 3
    static.copy_(torch.arange(10.0, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(tripled.cpu(), torch.arange(10.0) * 3)


FAULTING_RUN = """
import torch
from al_ext._extension import _C

def faulty(s, t):  # an index out of range: a device-side assert, reported at some later call
    bad = torch.full((s.shape[0],), 1 << 40, device=s.device, dtype=torch.long)
    return s.index_select(0, bad), t.clone(), s.new_zeros(()), s.new_zeros(())

def passing(s, t):
    return s * 1, t * 1, s.new_zeros(()), s.new_zeros(())

batches = [(torch.randn(64, 256, device="cuda"), torch.randn(64, 10, device="cuda")) for _ in range(6)]
side = torch.cuda.Stream()
with torch.cuda.stream(side):  # the caller's own current stream, which no stage may change
    out = _C.run_blocks([_C.python_block_step(faulty), _C.python_block_step(passing)], batches, True, [0, 1], 2, 1,
                        ["cuda:0", "cuda:0"])
    print("ERROR:", out.get("error"), flush=True)
    print("STREAM:", "kept" if torch.cuda.current_stream(0) == side else "changed", flush=True)
"""


@functools.cache
def faulting_run() -> tuple[str, str]:
    """FAULTING_RUN's output, in a process of its own, since the fault leaves the CUDA context
    unusable; run once for the tests that read it."""
    result = subprocess.run([sys.executable, "-c", FAULTING_RUN], capture_output=True, text=True, timeout=300)
    return result.stdout, result.stderr[-3000:]


def faulting_run_line(prefix: str) -> str:
    stdout, stderr = faulting_run()
    line = next((line for line in stdout.splitlines() if line.startswith(prefix)), None)
    assert line is not None, stdout + stderr
    return line


@needs_cuda
def test_an_asynchronous_device_fault_names_the_steps_it_may_lie_in():
    """The host learns of a device fault at whatever call it makes next, so the block it is
    at may not be the one at fault: the message says so and names the steps in question."""
    error = faulting_run_line("ERROR:")
    assert "device-side assert" in error or "CUDA error" in error, error
    assert "reports a fault at a later call" in error and "on batch" in error, error


@needs_cuda
def test_stages_failing_as_they_leave_restore_their_streams_on_their_own_threads():
    """After the fault each stage's leave() throws (no event can be recorded). The stage's
    stream was its worker thread's current one; restored anywhere but on that thread, it would
    replace the calling thread's current stream (tests/cpp/test_stage_scope.cpp checks the
    executor's part of this on the CPU)."""
    assert faulting_run_line("STREAM:") == "STREAM: kept"


@needs_cuda
def test_non_finite_loss_on_cuda_stops_the_run_and_the_block_is_not_updated():
    model = small_mlp(hidden=(24, 16, 12), backend="fused").cuda()
    opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
    with torch.no_grad():
        model.blocks[2].g[0].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.blocks[2].parameters()]
    x, y = data()
    with pytest.raises(al_ext.NonFiniteLossError, match="non-finite loss L_as in block 3, batch 0") as err:
        Pipeline(model, opts).run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)])
    assert (err.value.block, err.value.batch) == (3, 0)
    torch.cuda.synchronize()
    for a, b in zip(before, model.blocks[2].parameters()):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num()), "the device refused every non-finite step"
    assert all(float(state["step"]) == 0 for state in opts[2].state.values()), "a refused step is not counted"
    assert all(float(state["step"]) > 0 for state in opts[0].state.values())


@needs_two_gpus
def test_blocks_on_two_gpus_train_as_on_one():
    results = []
    for devices in (["cuda:0"], ["cuda:0", "cuda:1"]):
        model = small_mlp(hidden=(24, 16, 12, 8), backend="fused")
        opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
        pipeline = Pipeline(model, opts, devices=devices)
        x, y = data()
        pipeline.run([(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)])
        torch.cuda.synchronize()
        results.append(([p.detach().cpu() for p in model.parameters()], pipeline.block_devices))
    (one, _), (two, placed) = results
    assert len(set(placed)) == 2
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_two_gpus
def test_blocks_are_placed_again_by_measured_cost_before_each_run():
    model = small_mlp(hidden=(24, 16, 12, 8), backend="fused")
    opts = [al_ext.fused.FusedBlockAdam(b, 1e-3, 2e-3) for b in model.blocks]
    pipeline = Pipeline(model, opts, devices=["cuda:0", "cuda:1"])
    x, y = data()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 96, 8)]
    pipeline.run(batches)
    pipeline.block_costs = [10.0, 1.0, 1.0, 1.0]  # as if block 1 had been measured the costliest
    pipeline.run(batches)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert pipeline.block_devices == [cuda0, cuda1, cuda1, cuda1]
    for block, opt in zip(model.blocks, opts):
        device = next(block.parameters()).device
        assert all(state["exp_avg"].device == device for state in opt.state.values())


@needs_cuda
def test_shared_workers_are_refused_on_cuda():
    model = small_mlp().cuda()
    with pytest.raises(ValueError, match="shared=True shares the blocks among CPU threads"):
        Pipeline(model, Trainer(model, progress=False).optimizers, shared=True)
    assert not Pipeline(model, Trainer(model, progress=False).optimizers).shared, "a stream per stage on CUDA"


def test_bad_devices_are_refused():
    model = small_mlp()
    opts = Trainer(model, progress=False).optimizers
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        Pipeline(model, opts, devices=[])
    with pytest.raises(ValueError, match="devices must be CUDA devices .* got cpu"):
        Pipeline(model, opts, devices=["cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            Pipeline(model, opts, devices=["cuda:0"])
    with pytest.raises(ValueError, match="stage_devices must name one device per stage"):
        _C.run_blocks([_C.python_block_step(recording_consumer([]))], [], True, [0], 1, 1, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="not on meta"):
        _C.run_blocks([_C.python_block_step(recording_consumer([]))], [], True, [0], 1, 1, ["meta"])
