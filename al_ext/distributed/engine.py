"""DistributedALEngine: the engine (al_ext.engines) of one rank of a distributed AL run.

Each rank trains a contiguous range of blocks (its stage) on its share of every batch (its
replica; al_ext.distributed.stage_step says how, and rank_scheduler how a rank pipelines
its blocks in threads). Only activations travel: (s, t) forward from stage to stage, and
each batch's losses forward with them and back from the last stage, so that every rank
reports the same losses in order. Nothing else crosses a stage, so there is no backward
flush and no bubble but the first fill. The first stage reads the data; it starts a batch
only while fewer than ``max_in_flight`` batches await their losses, and it alone decides
where a run stops (its replicas agree first), telling the later stages in the stream.

Blocks a rank does not train live on the meta device there: they hold no memory, and
using them fails loudly. Checkpoints gather them (al_ext.distributed.checkpoint).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..engines import Engine
from ..errors import DistributedError, NonFiniteLossError
from ..fused import FusedBlockOptimizer
from ..large_buffers import reusing_large_buffers
from ..nn import AssociatedLearning
from ..pipeline import Batch, BatchCallback
from .._extension import _C
from ..precision import Precision
from . import checkpoint, placement
from .config import DistributedConfig, make_topology
from .inference import CrossRankInference, alike_on_every_rank, data_fingerprint
from .rank_scheduler import run_in_scheduler
from .stage_step import StageStep
from .transport import (BATCH, END, FORWARD_TAG, LOSSES_TAG, STOP, Header, Link, collective, failure_seen,
                        report_failure, wait)


class DistributedALEngine(Engine):
    """One rank's share of an AL run across processes (see the module's docstring).
    ``optimizers`` and ``schedulers`` are those of the whole model, as one process would
    make them (one fused optimiser or a torch pair per block); this rank steps its own and
    every scheduler (all ranks alike, so the rates stay one). Every rank holds the whole
    model until the blocks are placed (al_ext.distributed.placement), at the first training
    batch; then the blocks this rank does not train go to the meta device."""

    def __init__(self, model: AssociatedLearning, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str, precision: Precision, config: DistributedConfig) -> None:
        super().__init__(model, optimizers, schedulers, scheduler_interval, precision)
        if precision.name == "fp16":
            raise ValueError("distributed training runs in fp32 or bf16: fp16's loss scale is one state that "
                             "stages training different batches at once cannot share")
        self.config = config
        self.placed = False
        self.block_costs: list[float] | None = None  # what the blocks were placed by
        top = self.topology = make_topology(config, placement.parameter_costs(self))
        _check_same_model(model)
        per_block = 1 if isinstance(optimizers[0], FusedBlockOptimizer) else 2
        self.block_optimizers = [optimizers[per_block * i : per_block * (i + 1)] for i in range(model.depth)]
        self.device = next(model.parameters()).device
        timeout = datetime.timedelta(seconds=config.timeout_s)
        # Every rank makes every group, in the same order. A stage's replicas all-reduce in
        # theirs; the losses and the evaluation's scores travel in groups of their own, so that
        # NCCL, which ignores tags and keeps one queue per pair of ranks, cannot order a
        # receive posted ahead before the send it waits for.
        stage_groups = [dist.new_group(top.stage_ranks(s), timeout=timeout) for s in range(top.stages)]
        self.replica_group = stage_groups[top.stage]
        self.first_stage_group = stage_groups[0]
        self.losses_group = dist.new_group(list(range(top.world_size)), timeout=timeout)
        self.partial_losses_group = dist.new_group(list(range(top.world_size)), timeout=timeout)
        self.scores_group = dist.new_group(list(range(top.world_size)), timeout=timeout)
        self.max_in_flight = config.max_in_flight or 2 * top.stages
        self.rank_stages = config.rank_stages or torch.get_num_threads()
        self.link_device = torch.device("cpu") if dist.get_backend() == "gloo" else self.device
        self._prev = None if top.is_first else Link(top.rank_of(top.stage - 1), self.link_device, FORWARD_TAG)
        self._next = None if top.is_last else Link(top.rank_of(top.stage + 1), self.link_device, FORWARD_TAG)
        last = top.rank_of(top.stages - 1)
        self._losses_back = None if top.is_last else Link(last, self.link_device, LOSSES_TAG, self.losses_group)
        self._losses_out = ([Link(top.rank_of(s), self.link_device, LOSSES_TAG, self.losses_group)
                             for s in range(top.stages - 1)] if top.is_last else [])
        # Each batch's losses of the blocks so far, from each stage to the next, apart from (s, t):
        # a stage running its blocks in the scheduler knows them only once the batch is done.
        group = self.partial_losses_group
        self._partial_in = None if top.is_first else Link(top.rank_of(top.stage - 1), self.link_device, LOSSES_TAG,
                                                          group)
        self._partial_out = None if top.is_last else Link(top.rank_of(top.stage + 1), self.link_device, LOSSES_TAG,
                                                          group)
        self._step: StageStep | None = None  # made when the blocks are placed
        self.in_run = False  # inside run: the stages stand at different batches
        self.received_end = END  # how the previous stage ended the last stream
        self._inference: CrossRankInference | None = None

    # ---- placement ------------------------------------------------------------------------

    def _place(self, costs: list[float]) -> None:
        """Gives each stage its blocks, balanced by ``costs`` (the same on every rank); the
        blocks this rank does not train, and their optimisers' state, leave it."""
        top = self.topology = dataclasses.replace(self.topology, block_starts=tuple(
            _C.balanced_groups(costs, self.topology.stages)))
        self.block_costs = costs
        for i, block in enumerate(self.model.blocks):
            if i in top.blocks:
                continue
            block.to("meta")  # keeps the Parameter objects that the optimisers hold
            for opt in self.block_optimizers[i]:
                opt.state.clear()
                # Every rank steps every scheduler alike; these optimisers step elsewhere,
                # which torch's check of the order of step() calls cannot know.
                opt._opt_called = True  # type: ignore[attr-defined]
        if top.replicas > 1:  # the replicas start alike, as DistributedDataParallel's do
            first = top.rank_of(top.stage, 0)
            for i in top.blocks:
                for tensor in self.model.blocks[i].state_dict().values():
                    collective(partial(dist.broadcast, tensor, src=first, group=self.replica_group, async_op=True),
                               "the replicas' first weights")
        self._step = StageStep(self.model, self.block_optimizers, top.blocks, self.precision, top.replicas,
                               self.replica_group)
        self.placed = True

    def ensure_placed(self) -> None:
        """Places the blocks by parameter count where the run needs them placed before it has
        trained (every rank gets here alike: evaluation and checkpoints are collective)."""
        if not self.placed:
            self._place(placement.parameter_costs(self))

    def _place_by_first_batch(self, batch: Batch | None) -> None:
        """Rank 0 times every block on the first batch and tells the others."""
        costs = torch.tensor(placement.parameter_costs(self), dtype=torch.float64)
        if self.topology.rank == 0 and batch is not None:
            x, y = (v.to(self.device) for v in batch)
            costs = torch.tensor(placement.measured_costs(self, x, y), dtype=torch.float64)
        costs = costs.to(self.link_device)
        collective(partial(dist.broadcast, costs, src=0, async_op=True), "the blocks' measured costs")
        self._place(costs.cpu().tolist())

    # ---- what the Trainer asks of every rank at once --------------------------------------

    def agree(self, flag: bool) -> bool:
        """Whether any rank says ``flag``: so that every rank stops together."""
        vote = torch.tensor([1.0 if flag else 0.0], device=self.link_device)
        collective(partial(dist.all_reduce, vote, op=dist.ReduceOp.MAX, async_op=True), "the ranks' vote to stop")
        return bool(vote.item())

    def check_alike_on_every_rank(self, call: str, arguments: dict[str, Any], refusal: Exception | None) -> None:
        """Every rank sees every rank's ``arguments`` and objection, and raises alike: a rank
        that refused, validates or checkpoints where the others do not would leave them
        waiting in a collective it never joins."""
        every = _gathered((arguments, None if refusal is None else f"{type(refusal).__name__}: {refusal}"),
                          f"the ranks' {call} arguments")
        if refusal is not None:
            raise refusal
        me = dist.get_rank()
        for rank, (theirs, their_refusal) in enumerate(every):
            if their_refusal is not None:
                raise ValueError(f"rank {rank} refused {call} ({their_refusal}), so rank {me} stops too")
            for name, value in arguments.items():
                if theirs.get(name) != value:
                    raise ValueError(f"{call} must be called alike on every rank: rank {rank} has {name} "
                                     f"{theirs.get(name)!r}, rank {me} {value!r}")

    def report_failure(self, exc: BaseException) -> None:
        report_failure(exc)

    @property
    def inference(self) -> CrossRankInference:
        self.ensure_placed()
        if self._inference is None:
            self._inference = CrossRankInference(self)
        return self._inference

    def correct_counts(self, batches: Iterable[Batch]) -> tuple[Tensor | None, int]:
        self._refuse_in_run("evaluate()")
        return self.inference.correct_counts(batches)

    def predict(self, x: Tensor, depth: int | None = None) -> Tensor:
        """Predicted classes of every row of ``x`` through the full path or the shortcut of
        ``depth``, the same on every rank (every rank calls it, with the same ``x``)."""
        if depth is not None:
            depth = self.model._check_depth(depth)
        self._refuse_in_run("predict()")
        return self.inference.predict(x, depth)[0]

    def predict_adaptive(self, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """``AssociatedLearning.predict_adaptive`` across ranks: (classes, exit depths)."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a confidence in (0, 1], got {threshold!r}")
        self._refuse_in_run("predict_adaptive()")
        return self.inference.predict(x, threshold=threshold)

    def _refuse_in_run(self, what: str) -> None:
        if self.in_run:
            raise RuntimeError(f"{what} was called during a distributed run, when the stages stand at different "
                               "batches: call it between epochs (on_epoch, on_validation) or after fit, on every rank")

    @property
    def is_writer(self) -> bool:  # type: ignore[override]
        return self.topology.rank == 0

    def full_model_state(self, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        self._refuse_in_run("save()")
        self.ensure_placed()
        return checkpoint.full_model_state(self, state)

    def full_state_dict(self) -> dict[str, Any] | None:
        self.ensure_placed()
        return checkpoint.full_engine_state(self, self.state_dict())

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        checkpoint.load_owned(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads the whole run's engine state (as one process saves it): this rank's
        optimisers whole, the others' hyperparameters (learning rates: every rank keeps them
        all, as it steps every scheduler), the schedulers and the precision."""
        self.check_state_matches(state)
        owned = set(self.owned_optimizers())
        for j, (opt, saved) in enumerate(zip(self.optimizers, state["optimizers"])):
            if j in owned:
                opt.load_state_dict(saved)
            else:
                checkpoint.load_hyperparameters(opt, saved["param_groups"])
        for scheduler, s in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(s)
        self.precision.load_state_dict(state["precision"])

    def owns_block(self, block: int) -> bool:
        """Whether this rank holds block ``block``'s trained state (before the blocks are
        placed, every rank holds every block)."""
        return not self.placed or block in self.topology.blocks

    def owned_optimizers(self) -> list[int]:
        """The optimisers (by index) whose whole state this rank holds."""
        per_block = len(self.optimizers) // self.model.depth
        return [j for i in range(self.model.depth) if self.owns_block(i)
                for j in range(per_block * i, per_block * (i + 1))]

    def save_sharded(self, directory: str, run_state: dict[str, Any]) -> None:
        self._refuse_in_run("save()")
        self.ensure_placed()
        checkpoint.save_sharded(self, directory, run_state)

    def load_sharded(self, directory: str) -> None:
        checkpoint.load_sharded(self, directory)

    # ---- the run ------------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        out: list[Tensor] = []
        self.run([(x, y)], lambda _, losses, *rest: out.append(losses))
        return out[0]

    @reusing_large_buffers()
    def run(self, batches: Iterable[Batch], on_batch: BatchCallback) -> bool:
        """Trains on the batches (read by the first stage alone); ``on_batch(index, losses,
        samples)`` is called on every rank, in order, with every block's losses; the first
        stage's results decide whether to go on. Returns whether the stream ran out."""
        self.model.train()
        self.in_run = True
        try:
            stream: Iterator[Batch] | None = None
            if self.topology.is_first:
                stream = iter(batches)
                if not self.placed:
                    first = next(stream, None)
                    self._place_by_first_batch(first)
                    stream = itertools.chain([] if first is None else [first], stream)
            elif not self.placed:
                self._place_by_first_batch(None)
            if self.in_scheduler():
                return run_in_scheduler(self, stream, on_batch)
            return self._run_first(stream, on_batch) if stream is not None else self._run_later(on_batch)
        except BaseException as exc:
            report_failure(exc)
            raise
        finally:
            self.in_run = False

    def in_scheduler(self) -> bool:
        """Whether this rank's blocks run as a pipeline of threads (al_ext.distributed.rank_scheduler):
        on the CPU, with one replica, and more than one block and ``rank_stages``."""
        return (self.topology.replicas == 1 and self.device.type == "cpu"
                and min(self.rank_stages, len(self.topology.blocks)) > 1)

    def _step_schedulers(self) -> None:
        if self.scheduler_interval == "step":
            for scheduler in self.schedulers:
                scheduler.step()

    def _train(self, index: int, s: Tensor, t: Tensor, samples: int, losses: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's blocks on batch ``index``; errors say which batch, and a first batch
        that the blocks cannot take, which stage sent what."""
        try:
            assert self._step is not None
            s, t = self._step(s, t, samples, losses)
        except NonFiniteLossError as exc:
            raise exc.at_batch(index) from None
        except (RuntimeError, ValueError) as exc:
            if index > 0 or self.topology.is_first or isinstance(exc, DistributedError):
                raise
            raise ValueError(f"{self.topology.describe()} cannot take what stage {self.topology.stage} sends: s of "
                             f"shape {tuple(s.shape)} ({s.dtype}), t of shape {tuple(t.shape)} ({t.dtype}): "
                             f"{exc}") from exc
        self._step_schedulers()
        return s, t

    def send_activations(self, s: Tensor, t: Tensor) -> None:
        """A batch's (s, t) to the next stage, behind a header that says their shapes."""
        assert self._next is not None
        self._next.send(Header(BATCH, s.shape[0], (tuple(s.shape), tuple(t.shape)), (s.dtype, t.dtype)),
                        (s.to(self.link_device), t.to(self.link_device)))

    def send_losses(self, losses: Tensor, samples: int) -> None:
        """A batch's losses so far: to the next stage; from the last (all of them), to every earlier one."""
        message = torch.cat([torch.tensor([float(samples)], dtype=torch.float64), losses.reshape(-1)])
        message = message.to(self.link_device)
        for link in [self._partial_out] if self._partial_out is not None else self._losses_out:
            link.send_tensor(message)

    def _losses_message(self) -> Tensor:
        return torch.empty(1 + 2 * self.model.depth, dtype=torch.float64, device=self.link_device)

    def post_losses(self) -> tuple[Any, Tensor]:
        """A receive of one batch's losses from the last stage: [samples, L_as_1, L_ae_1, ...]
        in float64, of a fixed size, so that several can wait in order."""
        assert self._losses_back is not None
        return self._losses_back.post_tensor(self._losses_message())

    def post_partial_losses(self) -> tuple[Any, Tensor]:
        """A receive of one batch's losses of the blocks before this stage, from the previous one."""
        assert self._partial_in is not None
        return self._partial_in.post_tensor(self._losses_message())

    def losses_of(self, posted: tuple[Any, Tensor], peer: int | None, what: str) -> tuple[Tensor, int]:
        """A posted losses message, waited for: (losses (blocks, 2) float64, samples)."""
        work, message = posted
        wait(work, peer, what)
        message = message.cpu()
        return message[1:].reshape(self.model.depth, 2).clone(), int(message[0])

    def report(self, entry: tuple[int, Any], on_batch: BatchCallback) -> bool:
        """Hands a batch's losses, back from the last stage, to ``on_batch``; its result."""
        i, posted = entry
        losses, samples = self.losses_of(posted, self._losses_back.peer if self._losses_back else None,
                                         f"the losses of batch {i}")
        return bool(on_batch(i, losses, samples))

    def arrived(self, waiting: deque[tuple[int, Any]]) -> bool:
        return bool(waiting) and bool(waiting[0][1][0].is_completed())

    def _run_first(self, batches: Iterator[Batch], on_batch: BatchCallback) -> bool:
        top = self.topology
        waiting: deque[tuple[int, Any]] = deque()  # batches handed on whose losses have not come back
        index, stop, ended = 0, False, False
        while True:
            # Replicas report on the same batches before each decision (so they agree on it);
            # alone, a stage also takes whatever losses have already arrived.
            while waiting and (len(waiting) >= self.max_in_flight
                               or (top.replicas == 1 and self.arrived(waiting))):
                stop = self.report(waiting.popleft(), on_batch) or stop
            if top.replicas > 1:
                stop = self._agree_among_replicas(stop)
            if stop:
                break
            batch = next(batches, None)
            ended = batch is None
            if top.replicas > 1:
                ended = self._agree_among_replicas(ended, same=True)
            if ended:
                break
            x, y = (v.to(self.device, non_blocking=True) for v in batch)  # type: ignore[union-attr]
            if index == 0 and top.replicas > 1 and not self.replicas_read_alike(data_fingerprint(x, y), "batches"):
                raise self.replicas_read_apart("batches")
            samples = int(x.shape[0])
            s, t = self._shard(*self.model.inputs_and_targets(x, y))
            losses = torch.zeros(self.model.depth, 2, dtype=torch.float64)
            s, t = self._train(index, s, t, samples, losses)
            if top.is_last:
                stop = bool(on_batch(index, losses, samples))
            else:
                self.send_activations(s, t)
                self.send_losses(losses, samples)
                waiting.append((index, self.post_losses()))
            index += 1
        return self.finish_run(END if ended else STOP, waiting, on_batch)

    def finish_run(self, kind: int, waiting: deque[tuple[int, Any]], on_batch: BatchCallback) -> bool:
        """Tells the next stage how the stream ended, reports the batches still out, and
        waits for what this rank sent; whether the stream ran out."""
        if self._next is not None:
            self._next.send(Header(kind))
        while waiting:
            self.report(waiting.popleft(), on_batch)  # the batches already started finish
        for link in [self._next, self._partial_out, *self._losses_out]:
            if link is not None:
                link.flush()
        return kind == END

    def _shard(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """This replica's rows of a batch: consecutive, as even as the batch allows."""
        if self.topology.replicas == 1:
            return s, t
        part = self.topology.replica
        return torch.tensor_split(s, self.topology.replicas)[part], torch.tensor_split(t, self.topology.replicas)[part]

    def _agree_among_replicas(self, flag: bool, same: bool = False) -> bool:
        """The first stage's replicas decide together: any of them stopping stops all;
        with ``same``, they must all say the same (their streams must end together)."""
        votes = torch.tensor([float(flag), float(not flag)], device=self.link_device)
        collective(partial(dist.all_reduce, votes, op=dist.ReduceOp.MAX, group=self.first_stage_group, async_op=True),
                   "the replicas' vote on the stream")
        if same and bool(votes[0]) and bool(votes[1]):
            raise ValueError("the first stage's replicas read streams of different lengths: every replica must read "
                             "the same batches (not a DistributedSampler's share: al_ext splits each batch itself)")
        return bool(votes[0])

    def replicas_read_alike(self, fingerprint: Tensor, what: str) -> bool:
        """Whether the first stage's replicas agree on the ``data_fingerprint`` of what they
        read (the first training batch, all of an evaluation's): a per-rank seed or sampler
        makes them differ. Every replica of the first stage calls it at the same point."""
        return alike_on_every_rank(fingerprint, self.link_device, f"the replicas' {what}", self.first_stage_group)

    @staticmethod
    def replicas_read_apart(what: str) -> ValueError:
        return ValueError(f"the first stage's replicas read different {what}: every replica must read the same data "
                          "in the same order (the same seed, no DistributedSampler; al_ext splits each batch among "
                          "the replicas itself)")

    def _run_later(self, on_batch: BatchCallback) -> bool:
        top = self.topology
        waiting: deque[tuple[int, Any]] = deque()
        for index, s, t, posted in self.received_batches():
            losses, samples = self.losses_of(posted, top.rank_of(top.stage - 1), f"batch {index}'s losses so far")
            s, t = self._train(index, s.to(self.device), t.to(self.device), samples, losses)
            if not top.is_last:
                self.send_activations(s, t)
            self.send_losses(losses, samples)
            if top.is_last:
                on_batch(index, losses, samples)
            else:
                waiting.append((index, self.post_losses()))
            while self.arrived(waiting):
                self.report(waiting.popleft(), on_batch)
        return self.finish_run(self.received_end, waiting, on_batch)

    def received_batches(self) -> Iterator[tuple[int, Tensor, Tensor, tuple[Any, Tensor]]]:
        """The batches the previous stage sends: (index, s, t, the posted receive of their
        losses so far), until it says the stream ended (``_received_end``: END or STOP). The
        next batch's receives are posted before this one is handed out."""
        assert self._prev is not None
        top = self.topology
        posted = self._prev.post_header()
        index = 0
        while True:
            header, tensors = self._prev.receive(posted, f"batch {index}'s activations")
            if header.kind in (END, STOP):
                self.received_end = header.kind
                return
            if header.kind != BATCH:
                raise DistributedError(f"{top.describe()} got a message of kind {header.kind} while training: the "
                                       "ranks are out of step (did every rank call fit, evaluate and save alike?)")
            losses = self.post_partial_losses()  # sent after (s, t), so posted only for a batch that comes
            posted = self._prev.post_header()
            s, t = tensors
            yield index, s, t, losses
            index += 1


def _check_same_model(model: AssociatedLearning) -> None:
    """Refuses at the start a job whose ranks built different models: a stage would get
    activations of shapes its blocks do not take, or train another architecture."""
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    # The modules as printed (activations, their settings) and the losses: shapes alike do not
    # make one architecture.
    structure = [*repr(model).splitlines(), f"variant {model.variant}",
                 *(f"block {i + 1}'s auto-encoder loss {model.ae_loss_of(i)}" for i in range(model.depth))]
    for rank, (their_shapes, their_structure) in enumerate(_gathered((shapes, structure), "the ranks' models")):
        if their_shapes != shapes:
            diff = sorted(k for k in set(shapes) | set(their_shapes) if shapes.get(k) != their_shapes.get(k))
            where = (f"at {diff[0]} ({their_shapes.get(diff[0])} against {shapes.get(diff[0])}"
                     f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''})")
        elif their_structure != structure:
            theirs, mine = next((a, b) for a, b in itertools.zip_longest(their_structure, structure, fillvalue="")
                                if a != b)
            where = f"in {theirs.strip()!r} against {mine.strip()!r}"
        else:
            continue
        raise ValueError(f"every rank must build the same model: rank {rank}'s differs from rank {dist.get_rank()}'s "
                         f"{where}; build it from the same arguments on every rank")


def _gathered(value: Any, what: str) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    every: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(every, value)
    except Exception as exc:  # noqa: BLE001 - a peer that failed before it got here
        raise failure_seen(None, what, exc) from None
    return every
