"""StageStep: how one rank trains its blocks on its share of a batch.

One replica: each block takes exactly the step one process takes (the fused op, or
autograd and the block's two torch optimisers). R replicas: each block's gradients (the
fused op's gradient form, or autograd's), its two losses and its floating-point buffers
(BatchNorm's running statistics) are summed over the stage's replicas in one all-reduce
per block, started as soon as the block is done and finished while the next block
computes; then the block's optimiser takes the mean. A replica whose share of the batch is
not 1/R of it weighs its part by R x share, so the result is the mean over the whole batch,
as one process would compute it (and an empty share adds nothing).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..errors import NonFiniteLossError
from ..fused import FusedBlockOptimizer
from ..nn import AssociatedLearning
from ..pipeline import losses_backward
from ..precision import Precision
from .transport import failures_explained, wait


class StageStep:
    def __init__(self, model: AssociatedLearning, block_optimizers: list[list[torch.optim.Optimizer]],
                 blocks: range, precision: Precision, replicas: int, replica_group: Any) -> None:
        self.model, self.block_optimizers, self.blocks = model, block_optimizers, blocks
        self.precision, self.replicas, self.group = precision, replicas, replica_group
        self.fused = isinstance(block_optimizers[blocks.start][0], FusedBlockOptimizer)

    def __call__(self, s: Tensor, t: Tensor, samples: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Trains the blocks on (s, t), this replica's rows of a batch of ``samples``; writes
        their losses into ``losses`` (blocks, 2) and returns the last block's (s, t)."""
        if self.replicas == 1:
            for i in self.blocks:
                s, t, loss_as, loss_ae = self._exact(i, s, t)
                losses[i, 0], losses[i, 1] = loss_as, loss_ae
            return s, t
        weight = self.replicas * s.shape[0] / samples
        pending = None
        for i in self.blocks:
            s_next, t_next, bucket = self._reduce_started(i, s, t, weight)
            if pending is not None:
                self._update(*pending, losses)  # block i-1's all-reduce ran while block i computed
            pending = (i, bucket)
            s, t = s_next, t_next
        if pending is not None:
            self._update(*pending, losses)
        return s, t

    def _exact(self, i: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block i's step as one process takes it; NonFiniteLossError (nothing of block i
        updated) for a non-finite loss."""
        try:
            if self.fused:
                (opt,) = self.block_optimizers[i]
                return opt.train_step(s, t)
            out = self._autograd(i, s, t)
            if not bool(torch.isfinite(out.loss_as) & torch.isfinite(out.loss_ae)):
                which = "L_as" if not bool(torch.isfinite(out.loss_as)) else "L_ae"
                raise NonFiniteLossError(which, float(out.loss_as if which == "L_as" else out.loss_ae))
            for opt in self.block_optimizers[i]:
                opt.step()
            return out.s.detach(), out.t.detach(), out.loss_as.detach(), out.loss_ae.detach()
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(exc.loss, exc.value, block=i + 1, detail=self._updated_before(i)) from None

    def _updated_before(self, block: int) -> str:
        first = self.blocks.start
        return f"blocks {first + 1}-{block} of this stage were updated on this batch" if block > first else ""

    def _autograd(self, i: int, s: Tensor, t: Tensor) -> reference.BlockLosses:
        return losses_backward(self.model, self.block_optimizers[i], i, s, t, self.precision)

    def _params(self, i: int) -> list[Tensor]:
        return [p for opt in self.block_optimizers[i] for group in opt.param_groups for p in group["params"]]

    def _buffers(self, i: int) -> list[Tensor]:
        return [b for b in self.model.blocks[i].buffers() if b.is_floating_point()]

    def _reduce_started(self, i: int, s: Tensor, t: Tensor, weight: float) -> tuple[Tensor, Tensor, Any]:
        """Block i's local gradients, losses and buffers (weighted), with their all-reduce
        over the stage's replicas started."""
        params = self._params(i)
        if s.shape[0] == 0:  # a batch smaller than the replicas: this share adds nothing
            with torch.no_grad(), self.precision.autocast():
                block = self.model.blocks[i]
                s_next, t_next = block.f(s), block.g(t)
            grads = [torch.zeros_like(p) for p in params]
            pair = torch.zeros(2, dtype=params[0].dtype, device=params[0].device)
        elif self.fused:
            out = self.block_optimizers[i][0].gradients(s, t)
            s_next, t_next, grads = out.s, out.t, out.grads
            pair = torch.stack([out.loss_as, out.loss_ae]).to(grads[0].dtype)
        else:
            out = self._autograd(i, s, t)
            s_next, t_next = out.s.detach(), out.t.detach()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            pair = torch.stack([out.loss_as, out.loss_ae]).detach().to(grads[0].dtype)
        buffers = [b.clone() for b in self._buffers(i)]
        parts = [*grads, pair, *buffers]
        if weight != 1.0:  # equal shares need no pass over the gradients
            torch._foreach_mul_(parts, weight)
        with failures_explained(None, f"block {i + 1}'s gradient all-reduce"):
            works = [dist.all_reduce(part, group=self.group, async_op=True) for part in parts]
        return s_next, t_next, (works, grads, pair, buffers)

    def _update(self, i: int, bucket: tuple[list[Any], list[Tensor], Tensor, list[Tensor]], losses: Tensor) -> None:
        works, grads, pair, buffers = bucket
        for work in works:
            wait(work, None, f"block {i + 1}'s gradient all-reduce")
        pair = pair / self.replicas
        losses[i, 0], losses[i, 1] = pair[0], pair[1]
        for mine, mean in zip(self._buffers(i), buffers):
            mine.copy_(mean / self.replicas)
        if not bool(torch.isfinite(pair).all()):  # every replica sees the same sums, so all refuse
            which = 0 if not bool(torch.isfinite(pair[0])) else 1
            raise NonFiniteLossError(("L_as", "L_ae")[which], float(pair[which]), block=i + 1,
                                     detail=self._updated_before(i))
        if self.fused:
            self.block_optimizers[i][0].apply_gradients(grads, grad_scale=float(self.replicas))
            return
        torch._foreach_div_(grads, float(self.replicas))
        for p, g in zip(self._params(i), grads):
            p.grad = g
        for opt in self.block_optimizers[i]:
            opt.step()

