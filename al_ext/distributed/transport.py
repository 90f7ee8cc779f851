"""What travels between ranks, and how a failure reaches every rank.

Forward, from each stage to the next: per batch a fixed-size header (what follows, the
batch's sample count, the shapes and dtypes of s and t), then s, t and the losses of the
blocks so far. A header is posted ahead of the batch it announces, so a receive is always
waiting; what follows it is sized by it (a ragged last batch needs nothing more). Back,
from the last stage to every earlier one: each batch's sample count and the losses of
every block, in one message of fixed size, so that the receives of several batches can
wait at once (receives on one link complete in the order they were posted).

Failures: the rank that fails writes where and why into the job's store before it raises;
a rank whose send or receive then breaks (Gloo closes a failed peer's connections at
once; otherwise the process group's timeout bounds the wait) raises a DistributedError
that quotes it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DistributedError

MAX_DIMS = 6
HEADER_SIZE = 3 + 3 * (2 + MAX_DIMS)  # kind, samples, count; per tensor its dtype, ndim and shape
# Header kinds: a training batch, an evaluation batch, the end of the stream, a stop asked
# for by the first stage's reader (the stream is not exhausted).
BATCH, EVAL, END, STOP = 1, 2, 3, 4
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)
FORWARD_TAG, LOSSES_TAG, BACKWARD_TAG = 1, 2, 3
FAILURE_KEY = "al_ext/failure"


@dataclass
class Header:
    kind: int
    samples: int = 0
    shapes: tuple[tuple[int, ...], ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()

    def encode(self) -> Tensor:
        values = [self.kind, self.samples, len(self.shapes)]
        for shape, dtype in zip(self.shapes, self.dtypes):
            if len(shape) > MAX_DIMS:
                raise ValueError(f"a tensor sent between ranks has {len(shape)} dims; at most {MAX_DIMS} are carried")
            values += [DTYPES.index(dtype), len(shape), *shape]
        if len(values) > HEADER_SIZE:
            raise ValueError(f"a message between ranks needs a header of {len(values)} numbers; {HEADER_SIZE} are carried")
        return torch.tensor(values + [0] * (HEADER_SIZE - len(values)), dtype=torch.int64)

    @classmethod
    def decode(cls, values: Tensor) -> Header:
        v = values.tolist()
        kind, samples, count = v[0], v[1], v[2]
        shapes, dtypes, i = [], [], 3
        for _ in range(count):
            dtypes.append(DTYPES[v[i]])
            ndim = v[i + 1]
            shapes.append(tuple(v[i + 2 : i + 2 + ndim]))
            i += 2 + ndim
        return cls(kind, samples, tuple(shapes), tuple(dtypes))


class Link:
    """Point-to-point messages with one peer rank, on ``device`` (the CPU for Gloo), in
    ``group`` (the default one if None)."""

    def __init__(self, peer: int, device: torch.device, tag: int, group: Any = None) -> None:
        self.peer, self.device, self.tag, self.group = peer, device, tag, group
        self._sends: list[tuple[Any, Tensor]] = []  # in flight: the work, and the tensor it must keep alive

    def _isend(self, tensor: Tensor) -> None:
        tensor = tensor.contiguous()
        with failures_explained(self.peer, "a message to be sent"):
            self._sends.append((dist.isend(tensor, self.peer, group=self.group, tag=self.tag), tensor))

    def _irecv(self, buffer: Tensor) -> tuple[Any, Tensor]:
        with failures_explained(self.peer, "a message to be received"):
            return dist.irecv(buffer, self.peer, group=self.group, tag=self.tag), buffer

    def send(self, header: Header, tensors: tuple[Tensor, ...] = ()) -> None:
        """Sends the header and the tensors, without waiting for them to arrive."""
        self._reap()
        for tensor in (header.encode().to(self.device), *tensors):
            self._isend(tensor)

    def send_tensor(self, tensor: Tensor) -> None:
        """Sends one tensor whose size the peer knows, without waiting."""
        self._reap()
        self._isend(tensor)

    def post_tensor(self, buffer: Tensor) -> tuple[Any, Tensor]:
        """A receive into ``buffer``, posted now: receives posted on one link complete in order."""
        return self._irecv(buffer)

    def post_header(self) -> tuple[Any, Tensor]:
        """A receive of the next header, posted now, completed by ``receive``."""
        return self._irecv(torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.device))

    def receive(self, posted: tuple[Any, Tensor], what: str) -> tuple[Header, list[Tensor]]:
        """Completes a posted header's receive, then receives the tensors it announces."""
        work, buffer = posted
        wait(work, self.peer, what)
        header = Header.decode(buffer.cpu())
        tensors = [torch.empty(shape, dtype=dtype, device=self.device)
                   for shape, dtype in zip(header.shapes, header.dtypes)]
        for w, _ in [self._irecv(t) for t in tensors]:
            wait(w, self.peer, what)
        return header, tensors

    def _reap(self) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def flush(self) -> None:
        """Waits until everything sent has been taken by the peer."""
        for work, _ in self._sends:
            wait(work, self.peer, "a message to be received")
        self._sends = []


@contextmanager
def failures_explained(peer: int | None, what: str) -> Iterator[None]:
    """Turns a broken connection or a timeout inside into a DistributedError that says which
    rank failed first and why, where it said so."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any transport failure ends the run the same way
        raise failure_seen(peer, what, exc) from None


def wait(work: Any, peer: int | None, what: str) -> None:
    """Waits for a send, receive or collective (see ``failures_explained``)."""
    with failures_explained(peer, what):
        work.wait()


def collective(start: Callable[[], Any], what: str) -> None:
    """Starts a collective (``start`` calls it with ``async_op=True``) and waits for it."""
    with failures_explained(None, what):
        work = start()
    wait(work, None, what)


def failure_seen(peer: int | None, what: str, exc: BaseException) -> DistributedError:
    report = read_failure()
    me = dist.get_rank()
    if report is not None:
        return DistributedError(f"rank {me} stopped: rank {report['rank']} failed: {report['message']}",
                                report["rank"], report.get("block"), report.get("batch"))
    who = "a peer" if peer is None else f"rank {peer}"
    return DistributedError(f"rank {me} stopped: waiting for {who} ({what}) failed: {exc}. That rank failed, died "
                            "or did not answer within the timeout: see its own output", peer)


def report_failure(exc: BaseException, block: int | None = None, batch: int | None = None) -> None:
    """Writes this rank's failure into the job's store (the first one written stays), so
    that the ranks it leaves waiting can say what happened."""
    if isinstance(exc, DistributedError) or not dist.is_initialized():
        return  # a consequence of another rank's failure, already reported there
    block = getattr(exc, "block", block)
    batch = getattr(exc, "batch", batch)
    message = f"{type(exc).__name__}: {exc}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.compare_set(FAILURE_KEY, "", json.dumps({"rank": dist.get_rank(), "message": message,
                                                       "block": block, "batch": batch}))
    except Exception:  # noqa: BLE001 - the store may be gone with rank 0; the error still propagates
        pass


def read_failure() -> dict[str, Any] | None:
    try:
        store = dist.distributed_c10d._get_default_store()
        if not store.check([FAILURE_KEY]):
            return None
        return json.loads(store.get(FAILURE_KEY))
    except Exception:  # noqa: BLE001 - the store went with the rank that hosted it
        return None
