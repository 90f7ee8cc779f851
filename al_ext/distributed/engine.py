"""DistributedALEngine: the engine (al_ext.engines) of one rank of a distributed AL run.

Each rank trains a contiguous range of blocks (its stage) on its share of every batch (its
replica). Only activations travel: (s, t) forward from stage to stage, and each batch's
losses back from the last stage so that every rank reports the same losses, in order.
Nothing else crosses a stage, so there is no backward flush and no bubble but the first
fill. The first stage reads the data; it starts a batch only while fewer than
``max_in_flight`` batches await their losses.

With one replica a block trains exactly as in one process (bit for bit on the CPU at
equal intra-op thread counts). With R replicas each block's gradients and losses are
averaged over the stage's replicas (weighted by their share of the batch, so a ragged
batch is averaged as one process would) in one all-reduce per block, which runs while
the next block computes; then the block's optimiser takes them.

Blocks a rank does not train live on the meta device there: they hold no memory, and
using them fails loudly. Checkpoints gather them (al_ext.distributed.checkpoint).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..engines import Engine
from ..errors import NonFiniteLossError
from ..fused import FusedBlockOptimizer
from ..nn import AssociatedLearning
from ..pipeline import Batch, BatchCallback
from ..precision import Precision
from . import checkpoint
from .config import DistributedConfig, Topology, make_topology
from .transport import (BATCH, END, FORWARD_TAG, LOSSES_TAG, STOP, Header, Link, report_failure,
                        wait)


class DistributedALEngine(Engine):
    """One rank's share of an AL run across processes (see the module's docstring).
    ``optimizers`` and ``schedulers`` are those of the whole model, as one process would
    make them (one fused optimiser or a torch pair per block); this rank steps its own."""

    def __init__(self, model: AssociatedLearning, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str, precision: Precision, config: DistributedConfig) -> None:
        super().__init__(model, optimizers, schedulers, scheduler_interval, precision)
        if precision.name == "fp16":
            raise ValueError("distributed training runs in fp32 or bf16: fp16's loss scale is one state that "
                             "stages training different batches at once cannot share")
        self.config = config
        costs = [float(sum(p.numel() for p in block.parameters())) for block in model.blocks]
        self.topology: Topology = make_topology(config, costs)
        _check_same_model(model)
        self.fused = isinstance(optimizers[0], FusedBlockOptimizer)
        per_block = 1 if self.fused else 2
        self._block_optimizers = [optimizers[per_block * i : per_block * (i + 1)] for i in range(model.depth)]
        self.device = next(model.blocks[self.topology.blocks.start].parameters()).device
        top = self.topology
        # One all-reduce group per stage (every rank makes every group, in the same order).
        groups = [dist.new_group(top.stage_ranks(s)) for s in range(top.stages)] if top.replicas > 1 else None
        self._stage_group = None if groups is None else groups[top.stage]
        self.max_in_flight = config.max_in_flight or 2 * top.stages
        link_device = torch.device("cpu") if dist.get_backend() == "gloo" else self.device
        self._prev = None if top.is_first else Link(top.rank_of(top.stage - 1), link_device, FORWARD_TAG)
        self._next = None if top.is_last else Link(top.rank_of(top.stage + 1), link_device, FORWARD_TAG)
        self._link_device = link_device
        for i, block in enumerate(model.blocks):
            if i not in top.blocks:
                block.to("meta")  # keeps the Parameter objects the optimisers hold
                for opt in self._block_optimizers[i]:
                    # Every rank steps every scheduler alike (their state and the reported rates
                    # stay one); these optimisers step elsewhere, which torch's check cannot know.
                    opt._opt_called = True  # type: ignore[attr-defined]
        if self._stage_group is not None:  # the replicas start alike, as DistributedDataParallel's do
            for i in top.blocks:
                for tensor in model.blocks[i].state_dict().values():
                    dist.broadcast(tensor, src=top.rank_of(top.stage, 0), group=self._stage_group)
        self._inference: Any = None

    # ---- evaluation, inference, checkpoints: every rank takes part --------------------------

    @property
    def inference(self) -> Any:
        if self._inference is None:
            from .inference import CrossRankInference
            self._inference = CrossRankInference(self)
        return self._inference

    def correct_counts(self, batches: Iterable[Batch]) -> tuple[Tensor | None, int]:
        return self.inference.correct_counts(batches)

    def predict(self, x: Tensor, depth: int | None = None) -> Tensor:
        """Predicted classes of every row of ``x`` through the full path or the shortcut of
        ``depth``, the same on every rank (every rank calls it with the same ``x``)."""
        if depth is not None:
            depth = self.model._check_depth(depth)
        return self.inference.predict(x, depth)[0]

    def predict_adaptive(self, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """``AssociatedLearning.predict_adaptive`` across ranks: (classes, exit depths)."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a confidence in (0, 1], got {threshold!r}")
        return self.inference.predict(x, threshold=threshold)

    @property
    def is_writer(self) -> bool:  # type: ignore[override]
        return self.topology.rank == 0

    def full_model_state(self, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return checkpoint.full_model_state(self, state)

    def full_state_dict(self) -> dict[str, Any] | None:
        return checkpoint.full_engine_state(self, self.state_dict())

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        checkpoint.load_owned(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads the whole run's engine state (as one process saves it): this rank's
        optimisers, every scheduler (each rank steps them all alike) and the precision."""
        if len(state["optimizers"]) != len(self.optimizers) or len(state["schedulers"]) != len(self.schedulers):
            super().load_state_dict(state)  # says what does not match
        per_block = len(self.optimizers) // self.model.depth
        for i in self.topology.blocks:
            for j in range(per_block * i, per_block * (i + 1)):
                self.optimizers[j].load_state_dict(state["optimizers"][j])
        for scheduler, s in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(s)
        self.precision.load_state_dict(state["precision"])

    def save_sharded(self, directory: str, extra: dict[str, Any]) -> None:
        checkpoint.save_sharded(self, directory, extra)

    def load_sharded(self, directory: str) -> dict[str, Any]:
        return checkpoint.load_sharded(self, directory)

    # ---- one batch on this rank's blocks ------------------------------------------------

    def _shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This replica's rows of a batch: consecutive, as even as the batch allows."""
        if self.topology.replicas == 1:
            return x, y
        return (torch.tensor_split(x, self.topology.replicas)[self.topology.replica],
                torch.tensor_split(y, self.topology.replicas)[self.topology.replica])

    def _train_blocks(self, s: Tensor, t: Tensor, samples: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Trains this rank's blocks on (s, t), this replica's share of a batch of ``samples``;
        writes their losses into ``losses`` (blocks, 2) and returns the last block's (s, t)."""
        if self.topology.replicas == 1:
            for i in self.topology.blocks:
                s, t, loss_as, loss_ae = self._exact_step(i, s, t)
                losses[i, 0], losses[i, 1] = loss_as, loss_ae
            return s, t
        pending = None
        for i in self.topology.blocks:
            s_next, t_next, reduce = self._gradients_reduced(i, s, t, samples)
            if pending is not None:
                self._update(*pending, losses)  # block i-1's all-reduce ran while block i computed
            pending = (i, reduce)
            s, t = s_next, t_next
        if pending is not None:
            self._update(*pending, losses)
        return s, t

    def _exact_step(self, i: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block i's step as one process takes it; NonFiniteLossError (nothing of block i
        updated) for a non-finite loss."""
        try:
            if self.fused:
                (opt,) = self._block_optimizers[i]
                return opt.train_step(s, t)
            out = self._autograd_losses(i, s, t)
            if not bool(torch.isfinite(out.loss_as) & torch.isfinite(out.loss_ae)):
                which = "L_as" if not bool(torch.isfinite(out.loss_as)) else "L_ae"
                raise NonFiniteLossError(which, float(out.loss_as if which == "L_as" else out.loss_ae))
            for opt in self._block_optimizers[i]:
                opt.step()
            return out.s.detach(), out.t.detach(), out.loss_as.detach(), out.loss_ae.detach()
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(exc.loss, exc.value, block=i + 1,
                                     detail=_updated_before(self.topology.blocks.start, i)) from None

    def _autograd_losses(self, i: int, s: Tensor, t: Tensor) -> reference.BlockLosses:
        for opt in self._block_optimizers[i]:
            opt.zero_grad()
        with self.precision.autocast():
            out = reference.local_losses(self.model.blocks[i], s, t, self.model.variant, self.model.ae_loss_of(i))
        (out.loss_as + out.loss_ae).backward()
        return out

    def _block_params(self, i: int) -> list[Tensor]:
        return [p for opt in self._block_optimizers[i] for group in opt.param_groups for p in group["params"]]

    def _gradients_reduced(self, i: int, s: Tensor, t: Tensor, samples: int) -> tuple[Tensor, Tensor, Any]:
        """Block i's local gradients and losses, weighted by this replica's share of the
        batch, in one flat buffer whose all-reduce over the stage's replicas is started."""
        params = self._block_params(i)
        share = s.shape[0] / samples
        if s.shape[0] == 0:  # a batch smaller than the replicas: this one adds nothing
            s_next, t_next = self._empty_outputs(i, s, t)
            grads = [torch.zeros_like(p) for p in params]
            pair = torch.zeros(2, dtype=params[0].dtype, device=params[0].device)
        elif self.fused:
            out = self._block_optimizers[i][0].gradients(s, t)
            s_next, t_next, grads = out.s, out.t, out.grads
            pair = torch.stack([out.loss_as, out.loss_ae]).to(grads[0].dtype)
        else:
            out = self._autograd_losses(i, s, t)
            s_next, t_next = out.s.detach(), out.t.detach()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            pair = torch.stack([out.loss_as, out.loss_ae]).detach().to(grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [pair]) * share
        work = dist.all_reduce(flat, group=self._stage_group, async_op=True)
        return s_next, t_next, (work, flat, params)

    def _empty_outputs(self, i: int, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), self.precision.autocast():
            block = self.model.blocks[i]
            return block.f(s), block.g(t)

    def _update(self, i: int, reduce: tuple[Any, Tensor, list[Tensor]], losses: Tensor) -> None:
        work, flat, params = reduce
        wait(work, None, f"block {i + 1}'s gradient all-reduce")
        pair = flat[-2:]
        losses[i, 0], losses[i, 1] = pair[0], pair[1]
        if not bool(torch.isfinite(pair).all()):  # every replica sees the same sums, so all refuse
            which = 0 if not bool(torch.isfinite(pair[0])) else 1
            raise NonFiniteLossError(("L_as", "L_ae")[which], float(pair[which]), block=i + 1,
                                     detail=_updated_before(self.topology.blocks.start, i))
        grads, offset = [], 0
        for p in params:
            grads.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        if self.fused:
            self._block_optimizers[i][0].apply_gradients(grads)
            return
        for p, g in zip(params, grads):
            p.grad = g
        for opt in self._block_optimizers[i]:
            opt.step()

    # ---- the run ------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        out: list[Tensor] = []
        self.run([(x, y)], lambda _, losses, *rest: out.append(losses))
        return out[0]

    def run(self, batches: Iterable[Batch], on_batch: BatchCallback) -> bool:
        """Trains on the batches (read by the first stage alone); ``on_batch(index, losses,
        samples)`` is called on every rank, in order, with every block's losses. Returns
        whether the stream ran out (rather than ``on_batch`` stopping it)."""
        self.model.train()
        try:
            if self.topology.is_first:
                return self._run_first(iter(batches), on_batch)
            return self._run_later(on_batch)
        except BaseException as exc:
            report_failure(exc)
            raise

    def _losses_link(self, stage: int) -> Link:
        top = self.topology
        return Link(top.rank_of(stage), self._link_device, LOSSES_TAG)

    def _finish_batch(self, index: int, s: Tensor, t: Tensor, losses: Tensor, samples: int) -> None:
        """Hands a batch on: (s, t) to the next stage, or, from the last, the losses to every earlier one."""
        if self._next is not None:
            self._next.send(Header(BATCH, samples, (tuple(s.shape), tuple(t.shape), tuple(losses.shape)),
                                   (s.dtype, t.dtype, losses.dtype)),
                            (s.to(self._link_device), t.to(self._link_device), losses.to(self._link_device)))
        else:
            message = torch.cat([torch.tensor([float(samples)], dtype=torch.float64), losses.double().reshape(-1)])
            for link in self._loss_links:
                link.send_tensor(message.to(self._link_device))

    @property
    def _loss_links(self) -> list[Link]:
        if not hasattr(self, "_loss_links_cache"):
            self._loss_links_cache = [self._losses_link(s) for s in range(self.topology.stages - 1)]
        return self._loss_links_cache

    def _step_schedulers(self) -> None:
        if self.scheduler_interval == "step":
            for scheduler in self.schedulers:
                scheduler.step()

    def _run_first(self, batches: Iterator[Batch], on_batch: BatchCallback) -> bool:
        top = self.topology
        back = None if top.is_last else self._losses_from_last()
        waiting: deque[tuple[int, Any]] = deque()  # batches sent on whose losses have not come back
        index, stopped, ended = 0, False, False

        def report(entry: tuple[int, Any]) -> bool:
            return bool(self._report(back, entry, on_batch))

        while not stopped:
            while waiting and (len(waiting) >= self.max_in_flight or _arrived(waiting[0][1])):
                stopped = report(waiting.popleft()) or stopped
            if stopped:
                break
            batch = next(batches, None)
            if batch is None:
                ended = True
                break
            x, y = (v.to(self.device, non_blocking=True) for v in batch)
            samples = int(x.shape[0])
            s, t = self._shard(self.model.check_input(x), self.model.label_targets(y))
            losses = torch.zeros(self.model.depth, 2, dtype=torch.float64)
            s, t = self._train_received(index, s, t, samples, losses)
            self._step_schedulers()
            if top.is_last:
                stopped = bool(on_batch(index, losses, samples))
            else:
                self._finish_batch(index, s, t, losses, samples)
                waiting.append((index, self._post_losses(back)))
            index += 1
        if self._next is not None:
            self._next.send(Header(END if ended else STOP))
        while waiting:
            report(waiting.popleft())
        self._flush()
        return ended

    def _losses_from_last(self) -> Link:
        return Link(self.topology.rank_of(self.topology.stages - 1), self._link_device, LOSSES_TAG)

    def _run_later(self, on_batch: BatchCallback) -> bool:
        top = self.topology
        back = None if top.is_last else self._losses_from_last()
        waiting: deque[tuple[int, Any]] = deque()
        assert self._prev is not None
        posted = self._prev.post_header()
        index = 0
        while True:
            header, tensors = self._prev.receive(posted, f"batch {index}'s activations")
            if header.kind in (END, STOP):
                break
            posted = self._prev.post_header()  # the next header's receive waits while this batch trains
            s, t, losses = (v.to(self.device) for v in tensors)
            losses = losses.double().cpu()
            s, t = self._train_received(index, s, t, header.samples, losses)
            self._step_schedulers()
            if top.is_last:
                self._finish_batch(index, s, t, losses, header.samples)
                on_batch(index, losses, header.samples)
            else:
                self._finish_batch(index, s, t, losses, header.samples)
                waiting.append((index, self._post_losses(back)))
            while waiting and _arrived(waiting[0][1]):
                self._report(back, waiting.popleft(), on_batch)
            index += 1
        if self._next is not None:
            self._next.send(Header(header.kind))
        while waiting:
            self._report(back, waiting.popleft(), on_batch)
        self._flush()
        return header.kind == END

    def _train_received(self, index: int, s: Tensor, t: Tensor, samples: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Trains this rank's blocks on batch ``index``; errors say which batch, and a first
        batch that the blocks cannot take, which stage sent what."""
        try:
            return self._train_blocks(s, t, samples, losses)
        except NonFiniteLossError as exc:
            raise exc.at_batch(index) from None
        except (RuntimeError, ValueError) as exc:
            if index > 0 or self.topology.is_first:
                raise
            first = self.topology.blocks.start + 1
            raise ValueError(f"stage {self.topology.stage + 1} (blocks from {first}) cannot take what stage "
                             f"{self.topology.stage} sends: s of shape {tuple(s.shape)} ({s.dtype}), t of shape "
                             f"{tuple(t.shape)} ({t.dtype}): {exc}") from exc

    def _post_losses(self, back: Link | None) -> tuple[Any, Tensor]:
        """A receive of one batch's losses from the last stage: [samples, L_as_1, L_ae_1, ...]
        in float64, of a fixed size, so that several can wait in order."""
        return back.post_tensor(torch.empty(1 + 2 * self.model.depth, dtype=torch.float64,  # type: ignore[union-attr]
                                            device=self._link_device))

    def _report(self, back: Link | None, entry: tuple[int, Any], on_batch: BatchCallback) -> Any:
        i, (work, message) = entry
        wait(work, back.peer if back is not None else None, f"the losses of batch {i}")
        message = message.cpu()
        return on_batch(i, message[1:].reshape(self.model.depth, 2), int(message[0]))

    def _flush(self) -> None:
        for link in [self._next, *getattr(self, "_loss_links_cache", [])]:
            if link is not None:
                link.flush()


def _check_same_model(model: AssociatedLearning) -> None:
    """Refuses at the start a job whose ranks built different models: a stage would get
    activations of shapes its blocks do not take, or train another architecture."""
    mine = {name: list(t.shape) for name, t in model.state_dict().items()}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"every rank must build the same model: rank {rank}'s differs from rank "
                             f"{dist.get_rank()}'s at {diff[0]} ({theirs.get(diff[0])} against {mine.get(diff[0])}"
                             f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); build it from the same "
                             "arguments on every rank")


def _arrived(posted: tuple[Any, Tensor]) -> bool:
    return bool(posted[0].is_completed())


def _updated_before(first: int, block: int) -> str:
    return f"blocks {first + 1}-{block} of this stage were updated on this batch" if block > first else ""
