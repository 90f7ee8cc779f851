"""One whole AL training step of an MLP on a GPU: the fused op against plain PyTorch, in one run.

    python -m pytest benchmarks/test_bench_block_cuda.py --benchmark-only --benchmark-columns=mean,rounds -s

The CUDA counterpart of test_bench_block.py (skipped without a GPU), in bfloat16 as issue 3
asks (float32 at one point for reference). Implementations, on the same model and batch:
- fused:    one al_ext::dense_block_adam_step_ per block (FusedBlockAdam, check_finite=False:
            the kernels refuse a non-finite step on the device, so nothing waits for the GPU);
- eager:    the reference with torch.optim.Adam(fused=True);
- compiled: the same with the losses' forward and backward from torch.compile.
- gemms:    only the step's GEMMs, with the same shapes, through cuBLAS (torch.mm): the
            rate the fused step is held against ("% of the cuBLAS GEMM rate for the same FLOPs").
Every timed call ends with torch.cuda.synchronize(). TF32 stays off for float32.
"""
from __future__ import annotations

import pytest
import torch

import al_ext
from al_ext.fused import FusedBlockAdam

from test_bench_block import linear_shapes, step_cost

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and al_ext._extension.has_cuda_kernels()),
                                reason="needs a CUDA device and an al_ext build with CUDA kernels")

# (batch, width, dtype): the NECO MNIST MLP (width 1024) at batch 256 and 4096, and a wider one.
POINTS = [(256, 1024, torch.bfloat16), (4096, 1024, torch.bfloat16), (4096, 4096, torch.bfloat16),
          (256, 1024, torch.float32)]


def timed_cuda(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def build(impl: str, batch: int, width: int, dtype: torch.dtype):
    torch.manual_seed(0)
    device = torch.device("cuda")
    if impl == "gemms":
        mats = []
        for i, o, dx in linear_shapes(width):
            x, w, dz = (torch.randn(s, device=device, dtype=dtype) for s in ((batch, i), (o, i), (batch, o)))
            mats.append((x, w, dz, dx))

        def step():
            for x, w, dz, dx in mats:
                torch.mm(x, w.t())      # forward
                torch.mm(dz.t(), x)     # weight gradient
                if dx:
                    torch.mm(dz, w)     # input gradient

        return step
    backend = "fused" if impl == "fused" else "reference"
    model = al_ext.ALMLP(784, 10, hidden=(width, width), label_dim=width, backend=backend).to(device, dtype)
    x = torch.rand(batch, 784, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    if impl == "fused":
        opts = [FusedBlockAdam(block, 1e-4, 2e-4) for block in model.blocks]
        t0 = model.label_targets(y)

        def step():
            s, t = x, t0
            for opt in opts:
                s, t, _, _ = opt.train_step(s, t, check_finite=False)

        return step
    opts = []
    for fb, gh in model.parameter_groups():
        opts += [torch.optim.Adam(fb, lr=1e-4, fused=True), torch.optim.Adam(gh, lr=2e-4, fused=True)]

    def total_loss(x, y):
        return sum(b.loss_as + b.loss_ae for b in model.local_losses(x, y))

    loss_fn = torch.compile(total_loss) if impl == "compiled" else total_loss

    def step():
        for opt in opts:
            opt.zero_grad(set_to_none=False)
        loss_fn(x, y).backward()
        for opt in opts:
            opt.step()

    return step


@pytest.fixture(scope="session")
def results():
    table: dict[tuple, dict[str, dict[str, float]]] = {}
    yield table
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| batch | width | dtype | impl | ms/step | samples/s | TFLOP/s | x eager | x compiled | of cuBLAS rate |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (batch, width, dtype), impls in table.items():
        base = {k: impls[k]["ms"] for k in ("eager", "compiled", "gemms") if k in impls}
        for impl, r in impls.items():
            cells = [f"{base[k] / r['ms']:.2f}" if k in base and impl != "gemms" else "-" for k in ("eager", "compiled")]
            of_gemm = f"{base['gemms'] / r['ms']:.0%}" if "gemms" in base else "-"
            print(f"| {batch} | {width} | {str(dtype).removeprefix('torch.')} | {impl} | {r['ms']:.3f} | "
                  f"{r['samples_per_s']:,.0f} | {r['tflops']:.1f} | {cells[0]} | {cells[1]} | {of_gemm} |")


@pytest.mark.parametrize("impl", ["gemms", "fused", "eager", "compiled"])
@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"batch{p[0]}-width{p[1]}-{str(p[2]).removeprefix('torch.')}")
def test_mlp_training_step_cuda(benchmark, results, point, impl):
    batch, width, dtype = point
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        step = build(impl, batch, width, dtype)
        for _ in range(3):  # warm-up; compiles on the first call
            step()
        torch.cuda.synchronize()
        repeat = max(5, min(200, int(0.2 / max(timed_cuda(step, 3), 1e-5))))

        def synced():
            for _ in range(repeat):
                step()
            torch.cuda.synchronize()

        benchmark.group = f"AL MLP step on CUDA, batch {batch}, width {width}, {dtype}"
        benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    seconds = benchmark.stats.stats.min / repeat
    flops, _ = step_cost(batch, width)
    info = {"ms": seconds * 1e3, "samples_per_s": batch / seconds, "tflops": flops / seconds / 1e12}
    benchmark.extra_info.update({k: round(v, 4) for k, v in info.items()})
    results.setdefault(point, {})[impl] = info
