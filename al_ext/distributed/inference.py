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
from typing import TYPE_CHECKING

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
        Only the first stage reads ``batches``; its replicas must read the same ones (each
        counts its own share of every batch), which is checked once they are read."""
        correct = torch.zeros(self.model.depth + 1, dtype=torch.float64)
        if self.top.is_first:
            read = torch.zeros(4, dtype=torch.float64)  # batches, then data_fingerprint's sums

            def inputs() -> Iterator[Tensor]:
                for x, y in batches:
                    x, y = x.to(self.engine.device), y.to(self.engine.device)
                    read.add_(torch.cat([torch.ones(1, dtype=torch.float64), data_fingerprint(x, y)]))
                    x, y = self.engine._shard(x, y)
                    if x.shape[0]:  # a batch smaller than the replicas leaves some with no rows
                        pairs.append(y)
                        yield x

            pairs: list[Tensor] = []
            for scores in self.scores_of_batches(inputs()):
                y = pairs.pop(0)
                correct[:-1] += torch.stack([(s.argmax(dim=1) == y).sum() for s in scores]).double().cpu()
                correct[-1] += y.shape[0]
            if self.top.replicas > 1:
                self.engine.check_replicas_read_alike(read, "evaluation data")
        else:
            for _ in self.scores_of_batches(None):
                pass
        correct = _summed_over_ranks(correct, self.engine.link_device)
        samples = int(correct[-1])
        return (correct[:-1].long() if samples else None), samples

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
        most, fewest = _reduced_over_ranks(torch.tensor([n, -n]), self.engine.link_device, dist.ReduceOp.MAX,
                                           "the number of rows to predict").tolist()
        if most != -fewest:  # every rank sees this, and raises alike
            raise ValueError(f"x must hold the same rows on every rank (each rank predicts its share of them): this "
                             f"rank has {n}, the ranks {-fewest} to {most}")
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


def data_fingerprint(x: Tensor, y: Tensor) -> Tensor:
    """(rows, sum of labels, sum of inputs) in float64 on the CPU: what replicas that read the
    same data agree on, and others almost surely do not."""
    return torch.tensor([x.shape[0], float(y.double().sum()), float(x.double().sum())], dtype=torch.float64)


def _reduced_over_ranks(tensor: Tensor, device: torch.device, op: dist.ReduceOp, what: str) -> Tensor:
    """``op`` over every rank, on the CPU (NCCL reduces only tensors on the GPU)."""
    on_device = tensor.to(device)
    collective(partial(dist.all_reduce, on_device, op=op, async_op=True), what)
    return on_device.cpu()


def _summed_over_ranks(tensor: Tensor, device: torch.device) -> Tensor:
    return _reduced_over_ranks(tensor, device, dist.ReduceOp.SUM, "the evaluation's counts")
