"""One whole AL training step of an MLP: the fused op against plain PyTorch, in one run.

    python -m pytest benchmarks/test_bench_block.py --benchmark-only --benchmark-columns=mean,rounds -s

Implementations, on the same model and batch, taking turns (benchmarks/interleave.py):
- gemms:    only the step's GEMMs, with the same shapes and libraries as the fused step on
            the CPU (forward and input gradients through oneDNN, weight gradients through
            torch.mm; on CUDA all through torch.mm): what the GEMM libraries give at these shapes;
- fused:    FusedBlockAdam.train_step, one al_ext::dense_block_adam_step_ call per block;
- fused-bf16: the same with compute_dtype=torch.bfloat16 (bf16 GEMMs, float32 master
            weights, Adam state and losses), where the CPU has bf16 hardware;
- eager:    the reference (al_ext.reference via model.local_losses, one backward of the summed
            losses) with torch.optim.Adam(fused=True), torch's fastest optimiser, and
            zero_grad() with its default: what a user would write;
- eager-bf16: the same under torch.autocast("cpu", bfloat16) (float32 weights, Adam and
            losses), which this CPU runs fast (AVX512_BF16): one line a user would add;
- compiled: the whole eager step (zero_grad, forward, both losses, backward, the optimisers)
            through torch.compile.

The floor of a step is the larger of its FLOPs over the GEMM rate (2048^3 float32) and its
unavoidable bytes over the copy bandwidth, both measured in this run; the GEMM rate is the
better of torch.mm's (MKL) and oneDNN's. The summary (shown with -s) gives, per
implementation, the median time, samples/s, GFLOP/s, the speed-up over eager (median of
per-round ratios, and best time against best time), the speed-up over eager-bf16 (median of
per-round ratios), the fraction of the same-shape GEMMs' time, and the fraction of the floor
reached, also at torch.mm's GEMM rate alone.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

import al_ext
from al_ext.fused import FusedBlockAdam, bf16_compute_available

from interleave import best_ratio, interleaved, median_ratio, median_time

# (batch, width): MLP 784 -> width -> width, label width = width, bridges 5 x width.
# (32, 1024) and (128, 1024) are the NECO MNIST MLP at the NECO and the later batch size.
POINTS = [(32, 1024), (128, 1024), (512, 1024), (32, 256), (128, 256), (512, 256)]
COMPILED_POINTS = {(32, 1024), (128, 1024)}


def linear_shapes(width: int) -> list[tuple[int, int, bool]]:
    """(in, out, needs input gradient) of every Linear of the 2-block model."""
    d, c = width, 10
    shapes = []
    for x_in, y_in in ((784, c), (width, d)):
        shapes += [(x_in, width, False), (width, 5 * d, True), (5 * d, d, True), (y_in, d, False), (d, y_in, True)]
    return shapes


def step_cost(batch: int, width: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one training step: forward, weight and input gradients; the bytes
    a step cannot avoid are each weight read for the forward and the input gradient, plus
    Adam's read and write of parameter, exp_avg and exp_avg_sq (4-byte floats)."""
    flops = bytes_ = 0.0
    for i, o, dx in linear_shapes(width):
        flops += 2 * batch * i * o * (3 if dx else 2)
        bytes_ += 4 * (i * o + o) * ((2 if dx else 1) + 6)
    return flops, bytes_


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def onednn_linear():
    """x w^T through oneDNN, as the fused CPU step's forward and input gradients; None
    where torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    return lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@pytest.fixture(scope="session")
def machine() -> dict[str, float]:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3
    mm = flops / timed(lambda: a @ b, 10)
    linear = onednn_linear()
    onednn = flops / timed(lambda: linear(a, b), 10) if linear else 0.0
    src = torch.randn(32 * 1024 * 1024)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), 10)
    return {"gemm_flops": max(mm, onednn), "mm_flops": mm, "onednn_flops": onednn, "copy_bytes": copy}


@pytest.fixture(scope="session")
def results(machine):
    """Collects every measurement and prints the comparison at the end (run with -s)."""
    table: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    yield table
    print(f"\nmeasured in this run: GEMM (2048^3 float32) {machine['mm_flops'] / 1e9:.0f} GFLOP/s torch.mm, "
          f"{machine['onednn_flops'] / 1e9:.0f} GFLOP/s oneDNN; copy {machine['copy_bytes'] / 1e9:.0f} GB/s")
    print("| batch | width | impl | ms/step | samples/s | GFLOP/s | x eager | x eager, best times | x eager-bf16 | "
          "of GEMMs | floor ms | of floor | of floor at torch.mm's rate |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (batch, width), impls in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for impl, r in impls.items():
            print(f"| {batch} | {width} | {impl} | {r['ms']:.1f} | {r['samples_per_s']:,.0f} | {r['gflops']:.0f} | "
                  f"{r['x_eager']:.2f} | {r['x_eager_best']:.2f} | {r['x_eager_bf16']:.2f} | {r['of_gemms']:.0%} | "
                  f"{r['floor_ms']:.1f} | "
                  f"{r['of_floor']:.0%} | {r['of_mm_floor']:.0%} |")


def gemms_of_step(batch: int, width: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Only the GEMMs of a training step, same shapes: forward, weight and input gradients."""
    mats = []
    for i, o, dx in linear_shapes(width):
        x, w, dz = (torch.randn(s, device=device, dtype=dtype) for s in ((batch, i), (o, i), (batch, o)))
        mats.append((x, w, dz, dx))
    onednn = onednn_linear() if device == "cpu" and dtype == torch.float32 else None
    linear = onednn or (lambda x, w: torch.mm(x, w.t()))

    def step():
        for x, w, dz, dx in mats:
            linear(x, w)
            torch.mm(dz.t(), x)
            if dx:
                linear(dz, w.t())

    return step


def build(impl: str, batch: int, width: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    if impl == "gemms":
        return gemms_of_step(batch, width, device, dtype)
    torch.manual_seed(0)
    backend = "fused" if impl.startswith("fused") else "reference"
    model = al_ext.ALMLP(784, 10, hidden=(width, width), label_dim=width, backend=backend).to(device, dtype)
    x = torch.rand(batch, 784, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    if impl in ("fused", "fused-bf16"):
        compute_dtype = torch.bfloat16 if impl == "fused-bf16" else None
        opts = [FusedBlockAdam(block, 1e-4, 2e-4, compute_dtype=compute_dtype) for block in model.blocks]
        t0 = model.label_targets(y)

        def step():
            s, t = x, t0
            for opt in opts:
                # On CUDA the kernels refuse a non-finite step themselves: nothing waits for the GPU.
                s, t, _, _ = opt.train_step(s, t, check_finite=False)

        return step
    opts = []
    for fb, gh in model.parameter_groups():
        opts += [torch.optim.Adam(fb, lr=1e-4, fused=True), torch.optim.Adam(gh, lr=2e-4, fused=True)]

    autocast = torch.autocast(device, dtype=torch.bfloat16) if impl == "eager-bf16" else contextlib.nullcontext()

    def step():
        for opt in opts:
            opt.zero_grad()
        with autocast:
            total = sum(b.loss_as + b.loss_ae for b in model.local_losses(x, y))
        total.backward()
        for opt in opts:
            opt.step()

    return torch.compile(step) if impl == "compiled" else step


def summarise(times: dict[str, list[float]], batch: int, width: int) -> dict[str, dict[str, float]]:
    """Per implementation: median time, throughput and the ratios to eager and to the GEMMs."""
    flops, _ = step_cost(batch, width)
    out = {}
    for impl, t in times.items():
        seconds = median_time(t)
        out[impl] = {"ms": seconds * 1e3, "samples_per_s": batch / seconds, "gflops": flops / seconds / 1e9,
                     "x_eager": median_ratio(times["eager"], t), "x_eager_best": best_ratio(times["eager"], t),
                     "x_eager_bf16": median_ratio(times["eager-bf16"], t),
                     "of_gemms": median_ratio(times["gemms"], t)}
    return out


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"batch{p[0]}-width{p[1]}")
def test_mlp_training_step(benchmark, machine, results, point):
    batch, width = point
    impls = ["gemms", "fused"] + (["fused-bf16"] if bf16_compute_available() else []) + ["eager", "eager-bf16"]
    impls += ["compiled"] if point in COMPILED_POINTS else []
    steps = {impl: build(impl, batch, width) for impl in impls}
    for _ in range(2):  # warm-up; torch.compile compiles on the first call
        for step in steps.values():
            step()
    rounds = max(7, min(30, int(10.0 / max(sum(timed(s, 1) for s in steps.values()), 1e-3))))
    benchmark.group = f"AL MLP step, batch {batch}, width {width}, float32"
    times = interleaved(benchmark, steps, rounds)
    summary = summarise(times, batch, width)
    flops, bytes_ = step_cost(batch, width)
    floor = max(flops / machine["gemm_flops"], bytes_ / machine["copy_bytes"])
    mm_floor = max(flops / machine["mm_flops"], bytes_ / machine["copy_bytes"])
    for info in summary.values():
        info.update(floor_ms=floor * 1e3, of_floor=floor * 1e3 / info["ms"], of_mm_floor=mm_floor * 1e3 / info["ms"])
    benchmark.extra_info.update({impl: {k: round(v, 3) for k, v in info.items()} for impl, info in summary.items()})
    results[point] = summary
