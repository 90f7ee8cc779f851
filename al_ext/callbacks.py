"""Hooks into the Trainer's loop, and the loggers built on them.

A callback is any object with some of ``on_step(trainer, record)`` (after every batch),
``on_validation(trainer, metrics)`` and ``on_epoch(trainer, record)`` (after every epoch);
the Trainer calls those it has, on the thread that called ``fit``. Setting
``trainer.should_stop = True`` ends the run after the batches already started.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any

from .validation import check_positive_int

# The hooks the Trainer calls, on any callback that has them.
HOOKS: tuple[str, ...] = ("on_step", "on_validation", "on_epoch", "close")


class Callback:
    """A base with every hook doing nothing; override the ones you need."""

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        """``record``: epoch, batch (in the epoch, from 0), step (over the run, from 1),
        samples, samples_per_s (of this batch), the losses (loss_as and loss_ae per block for
        AL, loss for BP), and lr: the first optimiser's rate when the batch is reported, so
        after its step (pipelined, block 1's stage may already be batches further on)."""

    def on_validation(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """``metrics``: epoch, accuracy, and for AL the accuracy of every shortcut depth."""

    def on_epoch(self, trainer: Any, record: dict[str, Any]) -> None:
        """``record``: the epoch's history entry."""

    def close(self) -> None:
        """Called when the loggers are done (``Trainer.close_callbacks``)."""


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """Per-block lists as one column each (loss_as_1, loss_as_2, ...), for CSV and TensorBoard."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": v for i, v in enumerate(value, start=1)})
        else:
            out[key] = value
    return out


def _writes(trainer: Any) -> bool:
    """Whether this process writes logs: in a distributed run, where every rank sees the same
    records, the one that writes checkpoints; otherwise the only one."""
    return getattr(getattr(trainer, "engine", None), "is_writer", True)


class _FileLogger(Callback):
    """Writes the records of every ``every`` steps to log_dir's "steps" file, and every
    epoch's to its "epochs" file (in a distributed run, on the rank that writes checkpoints)."""

    def __init__(self, log_dir: str | Path, every: int = 1) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every = check_positive_int(every, "every")

    def _write(self, name: str, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        if record["step"] % self.every == 0 and _writes(trainer):
            self._write("steps", record)

    def on_epoch(self, trainer: Any, record: dict[str, Any]) -> None:
        if _writes(trainer):
            self._write("epochs", record)


class JSONLinesLogger(_FileLogger):
    """Appends one JSON object per line to ``log_dir/steps.jsonl`` (every ``every`` steps)
    and ``log_dir/epochs.jsonl``; no dependency beyond the standard library."""

    def __init__(self, log_dir: str | Path, every: int = 1) -> None:
        super().__init__(log_dir, every)
        self._files: dict[str, IO[str]] = {}

    def _write(self, name: str, record: dict[str, Any]) -> None:
        if name not in self._files:
            self._files[name] = open(self.dir / f"{name}.jsonl", "a", encoding="utf-8")
        self._files[name].write(json.dumps(record) + "\n")
        self._files[name].flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class CSVLogger(_FileLogger):
    """``log_dir/steps.csv`` and ``log_dir/epochs.csv``, one column per value (per block for
    AL's losses); the header is the first record's keys, or the file's own where a resumed
    run appends to it (a value it has no column for is left out, a column a record lacks is
    left empty: the first epoch's record holds the label warm-up's keys, later ones not)."""

    def __init__(self, log_dir: str | Path, every: int = 1) -> None:
        super().__init__(log_dir, every)
        self._writers: dict[str, tuple[IO[str], csv.DictWriter]] = {}

    def _write(self, name: str, record: dict[str, Any]) -> None:
        row = _flat(record)
        if name not in self._writers:
            path = self.dir / f"{name}.csv"
            new = not path.exists() or path.stat().st_size == 0
            if new:
                fieldnames = list(row)
            else:
                with open(path, newline="", encoding="utf-8") as existing:
                    fieldnames = next(csv.reader(existing))
            f = open(path, "a", newline="", encoding="utf-8")
            writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
            if new:
                writer.writeheader()
            self._writers[name] = (f, writer)
        f, writer = self._writers[name]
        writer.writerow(row)
        f.flush()

    def close(self) -> None:
        for f, _ in self._writers.values():
            f.close()
        self._writers.clear()


class TensorBoardLogger(Callback):
    """Scalars for TensorBoard through ``torch.utils.tensorboard`` (``pip install
    al-ext[tensorboard]``): train/* every ``every`` steps, epoch/* every epoch (in a
    distributed run, on the rank that writes checkpoints)."""

    def __init__(self, log_dir: str | Path, every: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install al-ext[tensorboard]") from exc
        self._make_writer = lambda: SummaryWriter(str(log_dir))
        self._writer: Any = None  # made on the first write: a rank that never writes leaves no event file
        self.every = check_positive_int(every, "every")

    def _scalars(self, trainer: Any, prefix: str, record: dict[str, Any], step: int, skipped: tuple[str, ...]) -> None:
        if not _writes(trainer):
            return
        if self._writer is None:
            self._writer = self._make_writer()
        for key, value in _flat(record).items():
            if key not in skipped and isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        if record["step"] % self.every == 0:
            self._scalars(trainer, "train", record, record["step"], ("epoch", "batch", "step"))

    def on_epoch(self, trainer: Any, record: dict[str, Any]) -> None:
        self._scalars(trainer, "epoch", record, record["epoch"], ("epoch",))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def loggers_for(log_dir: str | Path) -> list[Callback]:
    """What ``al-ext train --log-dir`` writes: JSON lines and CSV, and TensorBoard where installed."""
    loggers: list[Callback] = [JSONLinesLogger(log_dir), CSVLogger(log_dir)]
    if tensorboard_available():
        loggers.append(TensorBoardLogger(log_dir))
    return loggers
