"""al_ext::mse_loss_and_grad against eager PyTorch (F.mse_loss + autograd), in one run.

    python -m pytest benchmarks/test_bench_loss.py --benchmark-only --benchmark-columns=mean,stddev,rounds

The op is memory-bound: it reads input and target and writes the gradient once. The
floor is those bytes over the copy bandwidth measured in the same run (the "copy" rows).
"""
import pytest
import torch
import torch.nn.functional as F

from al_ext import ops

# (batch, width): label-side activations of the NECO MLP (width 1024), its bridge's hidden
# layer (5120), and a large batch.
SHAPES = [(32, 1024), (128, 1024), (128, 5120), (4096, 1024)]


def eager_loss_and_grad(x, t):
    x = x.detach().requires_grad_(True)
    loss = F.mse_loss(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["al_ext", "eager", "copy"])
def test_mse_loss_and_grad(benchmark, shape, impl):
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    out = torch.empty_like(x)
    run = {
        "al_ext": lambda: ops.mse_loss_and_grad(x, t),
        "eager": lambda: eager_loss_and_grad(x, t),
        "copy": lambda: out.copy_(x),
    }[impl]
    benchmark.group = f"mse_loss_and_grad {shape[0]}x{shape[1]} float32"
    benchmark(run)
    moved = (2 if impl == "copy" else 3) * x.numel() * x.element_size()
    benchmark.extra_info["GB/s"] = round(moved / benchmark.stats.stats.mean / 1e9, 2)
