"""One whole AL training step of an MLP on a GPU: the fused op against plain PyTorch, in one run.

    python -m pytest benchmarks/test_bench_block_cuda.py --benchmark-only --benchmark-columns=mean,rounds -s

The CUDA counterpart of test_bench_block.py (skipped without a GPU), with the same
implementations taking turns, in bfloat16 as issue 3 asks:
gemms (the step's GEMMs alone through cuBLAS: "the cuBLAS GEMM rate for the same FLOPs"),
fused (FusedBlockAdam, check_finite=False: the kernels refuse a non-finite step on the
device, so nothing waits for the GPU), fused-graph (the same two fused steps captured in one
CUDA graph, Adam counting its steps on the device, one launch per training step), eager
(the reference with Adam(fused=True)) and compiled (torch.compile of the losses, at the
points of COMPILED_POINTS only), all with bfloat16 parameters; and with float32 parameters and
Adam state (master weights), fused-bf16 (FusedBlockAdam with compute_dtype=torch.bfloat16)
against eager-bf16 (the reference under torch.autocast in bfloat16, the user's alternative).
Each timed call runs enough steps to last about 20 ms, then synchronises.
"""
from __future__ import annotations

import pytest
import torch

import al_ext

from al_ext.fused import dense_block_adam_step_, dense_block_layout
from interleave import interleaved, median_ratio
from test_bench_block import build, summarise

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and al_ext._extension.has_cuda_kernels()),
                                reason="needs a CUDA device and an al_ext build with CUDA kernels")

# (batch, width, dtype): the NECO MNIST MLP (width 1024) at issue 3's two GPU batch sizes.
# torch.compile runs cold in a fresh device machine and takes most of a minute per shape, so
# it is measured at one point only: scripts/gpu_check.sh runs one point per call (-k).
POINTS = [(256, 1024, torch.bfloat16), (4096, 1024, torch.bfloat16)]
COMPILED_POINTS = {(4096, 1024, torch.bfloat16)}


@pytest.fixture(scope="session")
def results():
    table: dict[tuple, dict[str, dict[str, float]]] = {}
    yield table
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| batch | width | dtype | impl | ms/step | samples/s | TFLOP/s | x eager | x compiled | of GEMMs |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (batch, width, dtype), impls in table.items():
        for impl, r in impls.items():
            print(f"| {batch} | {width} | {str(dtype).removeprefix('torch.')} | {impl} | {r['ms']:.3f} | "
                  f"{r['samples_per_s']:,.0f} | {r['gflops'] / 1e3:.1f} | {r['x_eager']:.2f} | "
                  f"{r.get('x_compiled', float('nan')):.2f} | {r['of_gemms']:.0%} |")


def fused_graph_step(batch: int, width: int, dtype: torch.dtype):
    """The 'fused' implementation's training step (both blocks, Adam, lr 1e-4 and 2e-4),
    captured in one CUDA graph: each call replays it."""
    torch.manual_seed(0)
    model = al_ext.ALMLP(784, 10, hidden=(width, width), label_dim=width, backend="fused").to("cuda", dtype)
    x = torch.rand(batch, 784, device="cuda", dtype=dtype)
    t0 = model.label_targets(torch.randint(0, 10, (batch,), device="cuda"))
    blocks = []
    for block in model.blocks:
        params, x_activation, h_activation = dense_block_layout(block)
        params = [p.detach() for p in params]
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        blocks.append((params, state, torch.zeros((), device="cuda"), x_activation, h_activation))

    def step():
        s, t = x, t0
        for params, (exp_avg, exp_avg_sq), count, x_activation, h_activation in blocks:
            s, t, _, _ = dense_block_adam_step_(s, t, params, exp_avg, exp_avg_sq, count, 1e-4, 2e-4,
                                                x_activation=x_activation, h_activation=h_activation)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (cuBLAS workspaces), outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def repeated(step, times: int):
    def run():
        for _ in range(times):
            step()
    return run


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"batch{p[0]}-width{p[1]}-{str(p[2]).removeprefix('torch.')}")
def test_mlp_training_step_cuda(benchmark, results, point):
    batch, width, dtype = point
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        impls = ["gemms", "fused", "eager"] + (["compiled"] if point in COMPILED_POINTS else [])
        steps = {impl: build(impl, batch, width, "cuda", dtype) for impl in impls}
        # bf16 compute over float32 master weights and state (the dtype column does not apply).
        steps.update({impl: build(impl, batch, width, "cuda", torch.float32) for impl in ("fused-bf16", "eager-bf16")})
        steps["fused-graph"] = fused_graph_step(batch, width, dtype)
        for _ in range(3):  # warm-up; torch.compile compiles on the first call
            for step in steps.values():
                step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps["eager"]()
        end.record()
        end.synchronize()
        repeat = max(1, min(200, int(20.0 / max(start.elapsed_time(end), 1e-3))))
        benchmark.group = f"AL MLP step on CUDA, batch {batch}, width {width}, {dtype}"
        times = interleaved(benchmark, {k: repeated(s, repeat) for k, s in steps.items()}, rounds=7,
                            sync=torch.cuda.synchronize)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    per_step = {k: [t / repeat for t in v] for k, v in times.items()}
    summary = summarise(per_step, batch, width)
    for impl, info in summary.items():
        if "compiled" in per_step:
            info["x_compiled"] = median_ratio(per_step["compiled"], per_step[impl])
    benchmark.extra_info.update({impl: {k: round(v, 4) for k, v in info.items()} for impl, info in summary.items()})
    results[point] = summary
