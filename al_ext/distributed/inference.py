"""Inference across ranks: the full path, every shortcut and adaptive early exit, with each
block's modules on the rank that trains it.

x goes up through the f's stage by stage; each stage applies its bridges to its own depths
and sends back down everything decoded so far, which each earlier stage passes through its
own h's (h_k, ..., its first), until the first stage holds the class scores of every depth.
Each replica's pipeline takes its share of the rows; the results are summed over all ranks
(rows nobody else wrote are zero), so every rank gets them whole.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DistributedError
from ..pipeline import Batch
from .transport import BACKWARD_TAG, END, EVAL, FORWARD_TAG, Header, Link, collective, report_failure

if TYPE_CHECKING:
    from .engine import DistributedALEngine


class CrossRankInference:
    """The evaluation and prediction of a DistributedALEngine's model, every rank taking part."""

    def __init__(self, engine: DistributedALEngine) -> None:
        self.engine, self.model, self.top = engine, engine.model, engine.topology
        dev, top = engine.link_device, engine.topology
        self._up = None if top.is_last else Link(top.rank_of(top.stage + 1), dev, FORWARD_TAG)
        self._from_below = None if top.is_first else Link(top.rank_of(top.stage - 1), dev, FORWARD_TAG)
        group = engine.scores_group
        self._scores_from_above = None if top.is_last else Link(top.rank_of(top.stage + 1), dev, BACKWARD_TAG, group)
        self._scores_down = None if top.is_first else Link(top.rank_of(top.stage - 1), dev, BACKWARD_TAG, group)

    def _stage_scores(self, s: Tensor) -> list[Tensor]:
        """Scores of every depth from this stage's first block on, decoded down to the
        input of the previous stage's last h (the class scores, on the first stage); the
        later stages' part comes from above."""
        blocks, dev = self.model.blocks, self.engine.link_device
        first, end = self.top.blocks.start, self.top.blocks.stop
        bridged = []
        for k in range(first, end):
            s = blocks[k].f(s)
            bridged.append((k, blocks[k].b(s)))
        later: list[Tensor] = []
        if self._up is not None:
            self._up.send(Header(EVAL, s.shape[0], (tuple(s.shape),), (s.dtype,)), (s.to(dev),))
            header, (stacked,) = self._scores_from_above.receive(  # type: ignore[union-attr]
                self._scores_from_above.post_header(), "scores from the next stage")  # type: ignore[union-attr]
            later = list(stacked.to(self.engine.device).unbind(0)) if stacked.numel() else []
            later = [self._decode(t, end - 1, first) for t in later]
        own = [self._decode(t, k, first) for k, t in bridged]
        return own + later

    def _decode(self, t: Tensor, top_block: int, first: int) -> Tensor:
        for k in range(top_block, first - 1, -1):
            t = self.model.blocks[k].h(t)
        return t

    @torch.no_grad()
    def scores_of_batches(self, batches: Iterable[Tensor] | None) -> Iterator[list[Tensor]]:
        """On the first stage: for each input batch (this replica's rows), the class scores
        of every depth 1..L. On later stages (``batches`` None): serves the stream of
        batches that the previous stage sends, until it ends, yielding nothing."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.top.is_first:
                for x in batches or ():
                    yield self._stage_scores(self.model.check_input(x))
                if self._up is not None:
                    self._up.send(Header(END))
            else:
                self._serve()
            for link in (self._up, self._scores_down):
                if link is not None:
                    link.flush()
        except BaseException as exc:
            report_failure(exc)
            raise
        finally:
            self.model.train(was_training)

    def _serve(self) -> None:
        assert self._from_below is not None and self._scores_down is not None
        dev = self.engine.link_device
        while True:
            header, tensors = self._from_below.receive(self._from_below.post_header(), "inputs from the previous stage")
            if header.kind == END:
                if self._up is not None:
                    self._up.send(Header(END))
                return
            if header.kind != EVAL:
                raise DistributedError(f"{self.top.describe()} got a message of kind {header.kind} while evaluating: "
                                       "the ranks are out of step (did every rank call fit, evaluate and save alike?)")
            scores = self._stage_scores(tensors[0].to(self.engine.device))
            stacked = torch.stack(scores)
            self._scores_down.send(Header(EVAL, header.samples, (tuple(stacked.shape),), (stacked.dtype,)),
                                   (stacked.to(dev),))

    def correct_counts(self, batches: Iterable[Batch]) -> tuple[Tensor | None, int]:
        """Correct predictions per depth and the samples, over every replica, on every rank.
        Only the first stage reads ``batches``; its replicas must read the same ones in the
        same order (each counts its own share of every batch), which is checked once they
        are read, and every rank raises alike where they did not."""
        depth = self.model.depth
        correct = torch.zeros(depth + 2, dtype=torch.float64)  # per depth, samples, replicas that read apart
        if self.top.is_first:
            checking = self.top.replicas > 1
            read = torch.zeros(3, dtype=torch.float64, device=self.engine.device)  # data_fingerprint's, every row

            def inputs() -> Iterator[Tensor]:
                rows_read = 0
                for x, y in batches:
                    x, y = x.to(self.engine.device), y.to(self.engine.device)
                    if checking:
                        read.add_(data_fingerprint(x, y, first_row=rows_read))
                        rows_read += x.shape[0]
                    x, y = self.engine._shard(x, y)
                    if x.shape[0]:  # a batch smaller than the replicas leaves some with no rows
                        pairs.append(y)
                        yield x

            pairs: list[Tensor] = []
            for scores in self.scores_of_batches(inputs()):
                y = pairs.pop(0)
                correct[:depth] += torch.stack([(s.argmax(dim=1) == y).sum() for s in scores]).double().cpu()
                correct[depth] += y.shape[0]
            if checking and not self.engine.replicas_read_alike(read, "evaluation data"):
                correct[depth + 1] = 1
        else:
            for _ in self.scores_of_batches(None):
                pass
        correct = _summed_over_ranks(correct, self.engine.link_device)
        if correct[depth + 1]:  # every rank, later stages too, learns it from the sum
            raise self.engine.replicas_read_apart("evaluation data")
        samples = int(correct[depth])
        return (correct[:depth].long() if samples else None), samples

    def _rows(self, x: Tensor) -> tuple[Tensor, slice]:
        n, replicas = x.shape[0], self.top.replicas
        bounds = [len(part) for part in torch.tensor_split(torch.arange(n), replicas)]
        start = sum(bounds[: self.top.replica])
        return x[start : start + bounds[self.top.replica]], slice(start, start + bounds[self.top.replica])

    @torch.no_grad()
    def predict(self, x: Tensor, depth: int | None = None, threshold: float | None = None) -> tuple[Tensor, Tensor]:
        """(classes, exit depths from 1) of every row of ``x`` (the same on every rank),
        through the full path, the shortcut of ``depth``, or, with ``threshold``, adaptive
        early exit (each row leaves at the first depth whose confidence reaches it). Across
        ranks every depth is computed, so early exit chooses the same answers as in one
        process but saves no work."""
        n = x.shape[0]
        if not alike_on_every_rank(data_fingerprint(x, torch.zeros(n, device=x.device)), self.engine.link_device,
                                   "the rows to predict"):
            raise ValueError(f"x must hold the same rows on every rank (each rank predicts its share of them); this "
                             f"rank's {n} rows differ from another's")
        classes = torch.zeros(n, dtype=torch.int64)
        depths = torch.zeros(n, dtype=torch.int64)
        rows, where = self._rows(x.to(self.engine.device))
        if self.top.is_first:
            for scores in self.scores_of_batches([rows] if rows.shape[0] else []):
                chosen, exit_depth = self._choose(scores, depth, threshold)
                classes[where], depths[where] = chosen.cpu(), exit_depth.cpu()
        else:
            for _ in self.scores_of_batches(None):
                pass
        return (_summed_over_ranks(classes, self.engine.link_device),
                _summed_over_ranks(depths, self.engine.link_device))

    def _choose(self, scores: list[Tensor], depth: int | None, threshold: float | None) -> tuple[Tensor, Tensor]:
        n = scores[0].shape[0]
        if threshold is None:
            k = self.model.depth if depth is None else depth
            return scores[k - 1].argmax(dim=1), torch.full((n,), k, dtype=torch.int64)
        exit_depth = torch.full((n,), self.model.depth, dtype=torch.int64)
        classes = scores[-1].argmax(dim=1)
        undecided = torch.ones(n, dtype=torch.bool)
        for k, s in enumerate(scores[:-1], start=1):
            leave = (self.model.confidence(s).cpu() >= threshold) & undecided
            classes[leave.to(classes.device)] = s.argmax(dim=1)[leave.to(s.device)]
            exit_depth[leave] = k
            undecided &= ~leave
        return classes, exit_depth


def data_fingerprint(x: Tensor, y: Tensor, first_row: int = 0) -> Tensor:
    """(rows, and the sums of the labels and of each row's inputs, weighted by the rows'
    places from ``first_row``) in float64 on x's device, so that reading it waits for nothing:
    what ranks that read the same data in the same order agree on, and others almost surely
    do not. Sums are additive over batches read one after another. NaN and infinities count
    as fixed numbers, so that they agree too."""
    rows = x.shape[0]
    if rows == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    places = torch.arange(first_row + 1, first_row + rows + 1, dtype=torch.float64, device=x.device)
    inputs = x.reshape(rows, -1).double().nan_to_num(nan=0.5, posinf=1.0, neginf=-1.0).sum(dim=1)
    return torch.stack([places.new_tensor(float(rows)), places @ y.double(), places @ inputs])


def alike_on_every_rank(tensor: Tensor, device: torch.device, what: str, group: Any = None) -> bool:
    """Whether every rank of ``group`` (all if None) holds the same ``tensor``: one MAX over
    it and its negation. Every rank gets the same answer."""
    both = _reduced_over_ranks(torch.cat([tensor, -tensor]), device, dist.ReduceOp.MAX, what, group)
    highest, lowest = both[: tensor.numel()], -both[tensor.numel():]
    return bool(torch.equal(highest, lowest))


def _reduced_over_ranks(tensor: Tensor, device: torch.device, op: dist.ReduceOp, what: str, group: Any = None
                        ) -> Tensor:
    """``op`` over every rank of ``group``, on the CPU (NCCL reduces only tensors on the GPU)."""
    on_device = tensor.to(device)
    collective(partial(dist.all_reduce, on_device, op=op, group=group, async_op=True), what)
    return on_device.cpu()


def _summed_over_ranks(tensor: Tensor, device: torch.device) -> Tensor:
    return _reduced_over_ranks(tensor, device, dist.ReduceOp.SUM, "the evaluation's counts")
