"""The errors every training path raises, with where it happened as attributes, so that
callers branch on types and attributes, never on message text."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """A training step met a loss that is NaN or infinite, and was refused: the parameters
    it would have updated are unchanged.

    ``block``: the AL block (from 1), or None for an end-to-end (BP) network; ``batch``: the
    batch's index in its run or epoch (from 0), where known; ``loss``: "L_as", "L_ae" or
    "loss"; ``epoch``: the epoch (from 1), where a Trainer ran it.
    """

    def __init__(self, loss: str, value: float | None = None, block: int | None = None,
                 batch: int | None = None, epoch: int | None = None, detail: str = "") -> None:
        self.loss, self.value, self.block, self.batch, self.epoch = loss, value, block, batch, epoch
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        where = [f"block {self.block}"] if self.block is not None else []
        if self.batch is not None:
            where.append(f"batch {self.batch}")
        if self.epoch is not None:
            where.append(f"epoch {self.epoch}")
        value = "" if self.value is None else f" = {self.value}"
        text = f"non-finite loss {self.loss}{value}" + (f" in {', '.join(where)}" if where else "")
        text += "; that step was refused and changed no parameter"
        if self.detail:
            text += f" ({self.detail})"
        return text + " (lower the learning rate, or check the data for NaN or inf)"

    @classmethod
    def first_in(cls, losses: Tensor, detail: str = "") -> NonFiniteLossError:
        """The error for the first non-finite entry of AL losses (blocks, 2): block by block,
        L_as before L_ae (the order the executor reports them in)."""
        bad = (~losses.isfinite()).nonzero()
        block, which = (int(i) for i in bad[0])
        return cls(("L_as", "L_ae")[which], losses[block, which].item(), block=block + 1, detail=detail)

    def at_batch(self, batch: int) -> NonFiniteLossError:
        """The same error, placed at a batch (its index in the run or epoch)."""
        return NonFiniteLossError(self.loss, self.value, self.block, batch, self.epoch, self.detail)

    def in_epoch(self, epoch: int, batch: int | None = None) -> NonFiniteLossError:
        """The same error, placed in a Trainer's epoch (and at a batch of it)."""
        return NonFiniteLossError(self.loss, self.value, self.block, self.batch if batch is None else batch, epoch,
                                  self.detail)

    def __reduce__(self) -> tuple[type, tuple]:  # picklable across processes (torch.multiprocessing, distributed ranks)
        return NonFiniteLossError, (self.loss, self.value, self.block, self.batch, self.epoch, self.detail)


class DistributedError(RuntimeError):
    """A distributed run failed on some rank: ``rank`` is the one that failed first, where
    known, and ``block`` (from 1) and ``batch`` (from 0) say where, where known. Every rank
    raises it, so that the whole job ends rather than waits."""

    def __init__(self, message: str, rank: int | None = None, block: int | None = None,
                 batch: int | None = None) -> None:
        super().__init__(message)
        self.rank, self.block, self.batch = rank, block, batch

    def __reduce__(self) -> tuple[type, tuple]:
        return DistributedError, (str(self), self.rank, self.block, self.batch)
