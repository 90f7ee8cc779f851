"""Which blocks each stage trains: balanced by the time each block's step takes, measured on
the first training batch by rank 0 (every rank holds the whole model until then), or by
parameter count where a run places its blocks before it has trained (an evaluation or a
checkpoint first). Parameter counts mislead where the FLOPs do not follow the weights: a
conv block's cost grows with its feature maps, a bridge's with its width alone.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..fused import FusedBlockOptimizer
from ..pipeline import losses_backward

if TYPE_CHECKING:
    from .engine import DistributedALEngine

TRIALS = 2  # the fastest of this many timings of each block


def parameter_costs(engine: DistributedALEngine) -> list[float]:
    return [float(sum(p.numel() for p in block.parameters())) for block in engine.model.blocks]


def measured_costs(engine: DistributedALEngine, x: Tensor, y: Tensor) -> list[float]:
    """Seconds of each block's forward pass, losses and gradients on the batch (x, y), with
    nothing of the run changed: no update, and the buffers (BatchNorm's running statistics)
    and the random number generators as they were."""
    model = engine.model
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        s, t = model.inputs_and_targets(x, y)
        costs = []
        for i in range(model.depth):
            best = float("inf")
            for _ in range(TRIALS):
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                start = time.perf_counter()
                s_next, t_next = _gradients(engine, i, s, t)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                best = min(best, time.perf_counter() - start)
            costs.append(best)
            s, t = s_next, t_next
        return costs
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _gradients(engine: DistributedALEngine, i: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    optimizers = engine.block_optimizers[i]
    if isinstance(optimizers[0], FusedBlockOptimizer):
        out = optimizers[0].gradients(s, t)
        return out.s, out.t
    out = losses_backward(engine.model, optimizers, i, s, t, engine.precision)
    for opt in optimizers:
        opt.zero_grad()
    return out.s.detach(), out.t.detach()
