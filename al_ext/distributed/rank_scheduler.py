"""A rank's blocks in the C++ scheduler (the executor behind al_ext.Pipeline): on the CPU,
with one replica, a rank that trains several blocks runs them as a pipeline of its own,
its stages on threads, between the stage before it and the stage after it.

The scheduler pulls each batch's (s, t) from a source (the data on the first stage, the
previous stage's messages elsewhere), and a last step in the scheduler (the sink) sends
the outputs on as soon as they exist. Each batch's losses are known only when the
scheduler reports the batch, on the calling thread, so they travel on their own message
(engine.send_losses). Every block trains as in one process: bit for bit at equal thread
counts, as al_ext.Pipeline does.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._extension import _C
from ..errors import DistributedError, NonFiniteLossError
from ..fused import FusedBlockOptimizer
from ..pipeline import Batch, BatchCallback, python_block_step, stepped_rates
from .transport import END, STOP

if TYPE_CHECKING:
    from .engine import DistributedALEngine


def run_in_scheduler(engine: DistributedALEngine, batches: Iterable[Batch] | None, on_batch: BatchCallback) -> bool:
    """Trains this rank's blocks on the stream, pipelined in ``engine.rank_stages`` threads;
    returns whether the stream ran out."""
    top, model = engine.topology, engine.model
    first, end = top.blocks.start, top.blocks.stop
    steps, fused = _block_steps(engine)
    has_sink = not top.is_last
    if has_sink:
        steps.append(_C.python_block_step(lambda s, t: _sink(engine, s, t)))
    costs = list((engine.block_costs or [1.0] * model.depth)[first:end]) + ([0.0] if has_sink else [])
    starts = _C.balanced_groups(costs, min(engine.rank_stages, end - first))
    threads = max(1, torch.get_num_threads() // len(starts))
    pulled: deque[tuple[Any, int | None]] = deque()  # per batch pulled: its losses so far (posted) or its samples
    waiting: deque[tuple[int, Any]] = deque()  # batches handed on whose losses have not come back
    ended = {"kind": STOP if top.is_first else END, "stop": False}
    owned = set(engine.owned_optimizers())
    others = [s for j, s in enumerate(engine.schedulers) if j not in owned] if engine.scheduler_interval == "step" else []

    def source() -> Iterator[tuple[Tensor, Tensor]]:  # on the scheduler's first thread
        if top.is_first:
            for x, y in batches or ():
                x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
                pulled.append((None, int(x.shape[0])))
                s, t = model.inputs_and_targets(x, y)
                yield s.detach(), t
            ended["kind"] = END
            return
        for _, s, t, posted in engine.received_batches():
            pulled.append((posted, None))
            yield s.to(engine.device), t.to(engine.device)
        ended["kind"] = engine.received_end

    def batch_done(index: int, local: Tensor) -> bool:  # on this thread, in batch order
        posted, samples = pulled.popleft()
        if posted is None:
            losses = torch.zeros(model.depth, 2, dtype=torch.float64)
        else:
            losses, samples = engine.losses_of(posted, top.rank_of(top.stage - 1), f"batch {index}'s losses so far")
        losses[first:end] = local[: end - first]
        for scheduler in others:  # this rank's own blocks step theirs in their stage
            scheduler.step()
        engine.send_losses(losses, samples)
        stop = False
        if top.is_last:
            stop = bool(on_batch(index, losses, samples))
        else:
            waiting.append((index, engine.post_losses()))
            while waiting and (len(waiting) >= engine.max_in_flight or engine.arrived(waiting)):
                stop = engine.report(waiting.popleft(), on_batch) or stop
        ended["stop"] = ended["stop"] or (stop and top.is_first)  # the first stage alone decides
        return ended["stop"]

    try:
        with torch.no_grad() if fused else torch.enable_grad():
            out = _C.run_blocks(steps, source(), True, starts, engine.max_in_flight, threads,
                                [str(engine.device)] * len(starts), on_batch=batch_done,
                                max_unreported=len(starts) + (len(starts) - 1) * engine.max_in_flight)
    finally:
        for opt in engine.optimizers:
            if isinstance(opt, FusedBlockOptimizer):
                opt.scheduler_run_done()
    if "error" in out:
        step, batch, message, loss = out["error"]
        if step >= end - first:  # the sink: sending on failed
            raise DistributedError(message, block=None, batch=batch)
        if loss is not None:
            raise NonFiniteLossError(loss, block=first + step + 1, batch=batch)
        raise RuntimeError(f"block {first + step + 1} failed on batch {batch}: {message}")
    return engine.finish_run(ended["kind"], waiting, on_batch)


def _block_steps(engine: DistributedALEngine) -> tuple[list[Any], bool]:
    """The scheduler's step of each of this rank's blocks, with their per-step schedulers."""
    per_step = engine.scheduler_interval == "step" and engine.schedulers
    steps, fused = [], False
    for i in engine.topology.blocks:
        optimizers = engine.block_optimizers[i]
        j = engine.optimizers.index(optimizers[0])
        schedulers = engine.schedulers[j : j + len(optimizers)] if per_step else [None] * len(optimizers)
        if isinstance(optimizers[0], FusedBlockOptimizer):
            fused = True
            steps.append(optimizers[0].scheduler_step(next_lrs=stepped_rates(schedulers[0], optimizers[0])))
        else:
            steps.append(_C.python_block_step(python_block_step(engine.model, i, optimizers, schedulers,
                                                                engine.precision)))
    return steps, fused


def _sink(engine: DistributedALEngine, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The scheduler's last step: (s, t) to the next stage, as soon as they exist."""
    engine.send_activations(s, t)
    zero = torch.zeros((), dtype=torch.float32)
    return s, t, zero, zero
