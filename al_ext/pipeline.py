"""Pipelined training: every block of an AL network trains at the same time, block i on
batch j while block i+1 trains on batch j-1, in the C++ scheduler (csrc/scheduler/). The
batches come from any iterable, pulled only as the first block reaches them, so memory is
bounded by ``max_in_flight``, not by the length of the stream.

A block needs only the (s, t) that the block below produced for the same batch, with the
parameters that block had before its own update on that batch; so a pipelined pass gives
the same parameters as the sequential loop (bit for bit on the CPU with the same intra-op
thread count), in n + L - 1 steps of time instead of n * L.

On the CPU a stage is a worker thread, and by default the workers share the blocks: each
runs whichever block can step next. On CUDA each stage has a stream of its own:
the handoff to the next stage carries an event that the next stream waits for, so the
host does not wait for the device, and blocks may sit on several GPUs (``devices``).
"""
from __future__ import annotations

import atexit
import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from . import reference
from ._extension import _C, has_cuda_kernels
from .errors import NonFiniteLossError
from .fused import FusedBlockOptimizer
from .large_buffers import reusing_large_buffers
from .nn import AssociatedLearning
from .optim import check_scheduler, holds_exactly
from .precision import FP16Precision, Precision, make_precision
from .validation import check_batch_pair, check_positive_int

Batch = tuple[Tensor, Tensor]
Scheduler = torch.optim.lr_scheduler.LRScheduler  # stepped per batch (ReduceLROnPlateau has no such form)
# on_batch(batch index, losses (blocks, 2) float64); a true result stops the run gracefully.
BatchCallback = Callable[[int, Tensor], Any]


# The models a pipeline run is training now: two runs of one model at once would update its
# parameters from two sets of threads (and with torch optimisers, crash the process).
_TRAINING: set[int] = set()
_TRAINING_LOCK = threading.Lock()


@contextlib.contextmanager
def _the_only_run_of(model: AssociatedLearning) -> Iterator[None]:
    with _TRAINING_LOCK:
        if id(model) in _TRAINING:
            raise RuntimeError("a pipeline run is still training this model: a train() stream left before its end "
                               "stays open until it is closed (stream.close()) or collected, or a run on another "
                               "thread; finish it before starting another")
        _TRAINING.add(id(model))
    try:
        yield
    finally:
        with _TRAINING_LOCK:
            _TRAINING.discard(id(model))


# At interpreter exit, runs still going on (a train() stream left open, a run on a daemon
# thread) are stopped before the interpreter stops their threads: a thread stopped inside
# the scheduler's C++ aborted the process.
_EXITING = threading.Event()
_OPEN_STREAMS: set[Callable[[float], None]] = set()  # each stops and drains one train() stream, by a deadline


@atexit.register
def _stop_runs_at_exit(timeout_s: float = 30.0) -> None:
    """Bounded: a run stuck in its batch iterable (which the scheduler cannot interrupt) is
    left to the interpreter after ``timeout_s``."""
    _EXITING.set()  # every run polls it, and stops at once
    deadline = time.monotonic() + timeout_s
    for close in list(_OPEN_STREAMS):
        close(deadline)
    while _TRAINING and time.monotonic() < deadline:  # runs on other threads, stopping
        time.sleep(0.01)


class PipelineError(RuntimeError):
    """A block failed during a run; ``block`` (from 1) and ``batch`` (from 0) say where."""

    def __init__(self, block: int, batch: int, message: str) -> None:
        super().__init__(message)
        self.block, self.batch = block, batch


@dataclass
class PipelineRun:
    """What a run did.

    - ``losses``: (batches trained, blocks, 2) float64, each block's (L_as, L_ae) on each batch.
    - ``blocks``: per block, ``busy_s`` (time inside its steps) and ``batches``.
    - ``stages`` (pipelined runs; empty for ``pipelined=False``): per stage, a worker running
      consecutive blocks: ``blocks`` (first, end; every block for shared workers), ``device``,
      ``busy_s`` (inside its blocks' steps), ``wait_s`` (waiting for input or for room
      downstream), ``idle_fraction`` and ``peak_queued_bytes`` (the most bytes of its outputs
      waiting at once in the queue to the next stage; shared workers: of every block's).
    - ``devices``: per CUDA device the run used (none on the CPU): ``device``, ``blocks`` and
      ``stages`` on it (indices from 0 into the lists above), and ``peak_allocated_bytes``, the
      most memory torch's caching allocator held allocated at once on that device during the run
      (``torch.cuda.max_memory_allocated``, whose peak the run resets as it starts). It is the
      device's figure, not a stage's: the stages on the device together, their parameters,
      optimiser state, activations and queued handoffs, and whatever else the process keeps
      there. The allocator counts per device, so no per-stage figure can be measured.
    """

    losses: Tensor
    blocks: list[dict[str, float]]
    stages: list[dict[str, Any]]
    wall_s: float
    devices: list[dict[str, Any]] = field(default_factory=list)


class Pipeline:
    """Runs the training steps of ``model``'s blocks over a stream of batches.

    ``optimizers`` is the Trainer's list: one fused optimiser per block (the block's step
    runs in C++ with no Python and the GIL released), or a pair (f, b) and (g, h) of torch
    optimisers per block (the step calls back into Python, under ``precision``'s autocast:
    fp32 or bf16). ``schedulers``, if given, holds
    one learning-rate scheduler per optimiser, stepped after each batch by the worker that
    runs the optimiser's block: block i trains on batch j with the rates the sequential loop
    would give it, so per-step schedules keep pipelined training equal to sequential
    training. ``pipelined=False`` runs the same steps batch by batch, block by block (the C++
    sequential mode; on CUDA, on one stream).

    ``run(batches)`` trains on every batch and returns a PipelineRun; ``train(batches)``
    yields each batch's losses as it completes, for a loop of your own.

    A pipeline stage is a worker thread that runs a group of consecutive blocks on each
    batch; on CUDA it also has a stream of its own. ``stages`` groups are balanced by cost:
    each block's measured busy time in the previous run, its parameter count before the
    first. The default is one stage per core on the CPU, and one per block (a stream per
    block) on CUDA. ``shared`` (the CPU's default; CPU only): the ``stages`` workers share
    the blocks instead, each running whichever block can step next (the deepest first).
    Consecutive groups split blocks of unequal cost unevenly (blocks costing 2, 1, 1, 1 on
    two threads split 2 | 3, leaving the first idle a third of the time); shared workers
    keep every thread busy as long as no block alone costs more than a thread's share. Each
    block still trains on one batch at a time, in order, so the parameters are the same
    either way.
    ``max_in_flight`` bounds the batches queued between two stages (shared workers: waiting
    for each block), and on CUDA also how many batches a stage's stream may run behind its
    thread.
    ``threads_per_stage`` is each CPU stage's intra-op thread count (default: the cores
    shared out among the stages; all of them in sequential mode).

    ``cuda_graphs=True`` (CUDA, fused optimisers) replays each block's step from a CUDA
    graph after its first batch: one launch instead of some thirty, for blocks small
    enough that launching, not computing, bounds the step.

    ``devices`` (CUDA devices, for example ``["cuda:0", "cuda:1"]``) places the blocks
    before each run: consecutive groups, one group per device, with the optimisers' state
    moved along, balanced by cost like the stages (parameter count first, where the bridges
    dominate; then the measured times). Activations cross devices on a copy stream. Without
    it, every block stays where it is, and must still be there at each run.
    """

    def __init__(self, model: AssociatedLearning, optimizers: Sequence[torch.optim.Optimizer],
                 max_in_flight: int = 2, threads_per_stage: int | None = None, pipelined: bool = True,
                 stages: int | None = None, devices: Sequence[str | torch.device] | None = None,
                 cuda_graphs: bool = False, schedulers: Sequence[Scheduler] | None = None,
                 precision: Precision | str | None = None, shared: bool | None = None) -> None:
        if not isinstance(model, AssociatedLearning):
            raise TypeError(f"model must be an AssociatedLearning, got {type(model).__name__}")
        self.model = model
        self.max_in_flight = _count(max_in_flight, "max_in_flight")
        for name, flag in (("pipelined", pipelined), ("cuda_graphs", cuda_graphs)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.pipelined = pipelined
        self.block_costs = [float(sum(p.numel() for p in block.parameters())) for block in model.blocks]
        optimizers = list(optimizers)
        schedulers = list(schedulers) if schedulers is not None else [None] * len(optimizers)
        if len(schedulers) != len(optimizers):
            raise ValueError(f"schedulers must hold one scheduler per optimiser ({len(optimizers)}), got {len(schedulers)}")
        _check_ownership(model, optimizers, schedulers)
        self._devices = _cuda_devices(devices) if devices is not None else None
        self._optimizers = optimizers
        if self._devices is not None:
            _place_blocks(model, optimizers, self._devices, self.block_costs)
        self.block_devices = _block_devices(model)
        kinds = {d.type for d in self.block_devices}
        if not (kinds == {"cpu"} or kinds == {"cuda"}):
            raise ValueError("the pipeline runs every block on the CPU or every block on CUDA devices; the blocks are "
                             f"on {', '.join(str(d) for d in self.block_devices)}")
        self.on_cuda = kinds == {"cuda"}
        if self.on_cuda and not has_cuda_kernels():
            raise ValueError("the model is on CUDA but this build of al_ext has no CUDA support; rebuild it where "
                             "nvcc and a CUDA torch are installed")
        if not self.pipelined and len(set(self.block_devices)) > 1:
            raise ValueError("pipelined=False runs every block on one stream, so the blocks must share one device; "
                             f"they are on {', '.join(sorted({str(d) for d in self.block_devices}))}")
        cores = torch.get_num_threads()
        default_stages = model.depth if self.on_cuda else min(model.depth, cores)
        # More stages than blocks would leave some empty: the blocks bound them.
        self.stages = min(model.depth, default_stages if stages is None else _count(stages, "stages"))
        default_threads = max(1, cores // self.stages) if pipelined else cores
        self.threads_per_stage = (default_threads if threads_per_stage is None
                                  else _count(threads_per_stage, "threads_per_stage"))
        if shared is not None and not isinstance(shared, bool):
            raise TypeError(f"shared must be True, False or None (the device's default), got {shared!r}")
        if shared and self.on_cuda:
            raise ValueError("shared=True shares the blocks among CPU threads; on CUDA each stage is a stream "
                             "that keeps its group of blocks (use shared=False or None)")
        self.shared = (not self.on_cuda) if shared is None else shared
        self.precision = (make_precision(precision, model, self.block_devices[0]) if isinstance(precision, str)
                          else precision or Precision())
        if isinstance(self.precision, FP16Precision):
            raise ValueError("the pipeline trains in fp32 or bf16: fp16's loss scale is one state for every block, "
                             "which blocks training on different batches at once cannot share")
        self._schedulers = schedulers
        if all(isinstance(o, FusedBlockOptimizer) for o in optimizers) and len(optimizers) == model.depth:
            self._steps = [None] * model.depth
            self._fused = optimizers
        elif len(optimizers) == 2 * model.depth:
            self._fused = None
            self._steps = [python_block_step(model, i, optimizers[2 * i : 2 * i + 2], schedulers[2 * i : 2 * i + 2],
                                             self.precision) for i in range(model.depth)]
        else:
            raise ValueError(f"optimizers must hold one fused optimiser per block ({model.depth}) or a pair per "
                             f"block ({2 * model.depth}), got {len(optimizers)}")
        if self._fused is not None and any(o.compute_dtype != self.precision.compute_dtype for o in self._fused):
            raise ValueError(f"precision={self.precision.name!r} needs fused block steps with compute_dtype="
                             f"{self.precision.compute_dtype} (the Trainer makes them so), got "
                             f"{[o.compute_dtype for o in self._fused]}; or torch optimisers (the general path)")
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs and any(s is not None for s in schedulers):
            raise ValueError("cuda_graphs=True replays each step with the learning rates it was captured with; a "
                             "per-step schedule needs cuda_graphs=False (or a schedule stepped per epoch)")
        if self.cuda_graphs and not (self.on_cuda and self._fused is not None):
            raise ValueError("cuda_graphs=True replays fused block steps on CUDA: it needs the blocks on CUDA "
                             "devices and one fused optimiser (FusedBlockAdam or FusedBlockSGD) per block")
        self.last_run: PipelineRun | None = None

    def _block_steps(self) -> list[Any]:
        # Built for each run, so that the learning rates are the param groups' current ones.
        if self._fused is not None:
            return [opt.scheduler_step(cuda_graph=self.cuda_graphs, next_lrs=stepped_rates(self._schedulers[i], opt))
                    for i, opt in enumerate(self._fused)]
        return [_C.python_block_step(step) for step in self._steps]

    def _stage_devices(self, starts: list[int]) -> list[str]:
        """The device of each stage, which must hold all of its blocks."""
        devices = []
        for first, end in zip(starts, [*starts[1:], self.model.depth]):
            held = {str(d) for d in self.block_devices[first:end]}
            if len(held) > 1:
                raise ValueError(f"stage of blocks {first + 1}-{end} would span devices {', '.join(sorted(held))}; "
                                 "use at least one stage per device (stages=None gives one per block on CUDA)")
            devices.append(held.pop())
        return devices

    def _prepared(self, batches: Iterable[Batch]) -> Iterator[tuple[Tensor, Tensor]]:
        """(s_0, t_0) of each (inputs, labels) batch, made as the first block pulls it: the
        inputs copied to the first block's device without waiting (from pinned memory, the
        copy overlaps the work already queued)."""
        device = self.block_devices[0]
        for batch in batches:
            check_batch_pair(batch, "each batch")
            x, y = (t.to(device, non_blocking=True) if isinstance(t, Tensor) else t for t in batch)
            s, t = self.model.inputs_and_targets(x, y)
            yield s.detach(), t

    @property
    def lookahead(self) -> int:
        """The batches a full pipeline holds: one in each stage and ``max_in_flight`` in each
        queue between two stages (shared workers: one in each block and ``max_in_flight``
        waiting for each block after the first); ``train`` runs at most this many ahead of
        its reader."""
        if not self.pipelined:
            return 1
        holders = self.model.depth if self.shared else len(_C.balanced_groups(self.block_costs, self.stages))
        return holders + (holders - 1) * self.max_in_flight

    def run(self, batches: Iterable[Batch], on_batch: BatchCallback | None = None,
            should_abort: Callable[[], bool] | None = None, max_unreported: int = 0) -> PipelineRun:
        """Trains every block on every (inputs, labels) batch of ``batches``, in order; any
        iterable will do (a list, a generator, a DataLoader), and it is read lazily.

        ``on_batch(index, losses)`` is called on this thread, in batch order, as each batch
        completes on every block (losses: (blocks, 2) float64). If it returns a true value, no
        further batch is pulled; those already pulled still train on every block, so the
        parameters are those of sequential training on the batches trained
        (``len(run.losses)``). ``max_unreported`` > 0 (pipelined): a batch is pulled only
        once ``on_batch`` has returned for the batch that many before it, so a slow
        ``on_batch`` slows the run rather than falling behind it. ``should_abort()``, polled,
        stops the run at once (KeyboardInterrupt), as Ctrl-C does.

        Raises NonFiniteLossError (a block's loss was NaN or inf: that block's step was
        refused) or PipelineError (a block failed) naming the block and the batch, and
        re-raises what the iterable or on_batch raised, once every stage has stopped.
        """
        if on_batch is not None and not callable(on_batch):
            raise TypeError(f"on_batch must be a callable (index, losses) -> bool, got {type(on_batch).__name__}")
        if should_abort is not None and not callable(should_abort):
            raise TypeError(f"should_abort must be a callable () -> bool, got {type(should_abort).__name__}")
        if isinstance(max_unreported, bool) or not isinstance(max_unreported, int) or not 0 <= max_unreported < 2**31:
            raise ValueError(f"max_unreported must be an integer from 0 to 2**31 - 1, got {max_unreported!r}")
        # The claim on the model comes before anything of a run that goes on now is touched.
        with _the_only_run_of(self.model), reusing_large_buffers():
            return self._run(batches, on_batch, should_abort, max_unreported)

    def _run(self, batches: Iterable[Batch], on_batch: BatchCallback | None,
             should_abort: Callable[[], bool] | None, max_unreported: int) -> PipelineRun:
        if self._devices is not None:
            _place_blocks(self.model, self._optimizers, self._devices, self.block_costs)
            self.block_devices = _block_devices(self.model)
        elif _block_devices(self.model) != self.block_devices:
            raise ValueError("the model's blocks moved since this Pipeline was made (from "
                             f"{', '.join(str(d) for d in self.block_devices)} to "
                             f"{', '.join(str(d) for d in _block_devices(self.model))}); make a new Pipeline")
        shared_workers = self.stages if self.pipelined and self.shared else 0
        if shared_workers:  # every worker takes any block: no groups, every worker on the CPU
            starts, stage_devices = [], ["cpu"] * shared_workers
        else:
            starts = _C.balanced_groups(self.block_costs, self.stages) if self.pipelined else [0]
            stage_devices = self._stage_devices(starts)
        cuda_devices = sorted({d for d in stage_devices if torch.device(d).type == "cuda"})
        for device in cuda_devices:
            torch.cuda.reset_peak_memory_stats(device)

        def abort_now() -> bool:
            return _EXITING.is_set() or bool(should_abort is not None and should_abort())

        try:
            with torch.no_grad() if self._fused is not None else torch.enable_grad():
                out = _C.run_blocks(self._block_steps(), self._prepared(batches), self.pipelined, starts,
                                    self.max_in_flight, self.threads_per_stage, stage_devices,
                                    on_batch=on_batch, should_abort=abort_now, max_unreported=max_unreported,
                                    shared_workers=shared_workers)
        finally:
            for opt in self._fused or []:
                opt.scheduler_run_done()
        if "error" in out:
            block, batch, message, loss = out["error"]
            if loss is not None:
                raise NonFiniteLossError(loss, block=block + 1, batch=batch)
            raise PipelineError(block + 1, batch, message)
        wall = out["wall_s"]
        if all(b["busy_s"] > 0 for b in out["blocks"]):
            self.block_costs = [b["busy_s"] for b in out["blocks"]]  # balance the next run by what was measured
        stages = []
        for stage, device in zip(out["stages"], stage_devices):
            idle = max(0.0, 1.0 - stage["busy_s"] / wall) if wall > 0 else 0.0
            stages.append(dict(stage, device=device, idle_fraction=idle))
        devices = [self._device_peak(device, stage_devices if self.pipelined else []) for device in cuda_devices]
        self.last_run = PipelineRun(out["losses"], out["blocks"], stages, wall, devices)
        return self.last_run

    def _device_peak(self, device: str, stage_devices: list[str]) -> dict[str, Any]:
        """What PipelineRun.devices says of ``device`` after a run (every stage on it has left)."""
        return {"device": device,
                "blocks": [i for i, d in enumerate(self.block_devices) if str(d) == device],
                "stages": [g for g, d in enumerate(stage_devices) if d == device],
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(device)}

    def train(self, batches: Iterable[Batch]) -> Iterator[Tensor]:
        """Trains on ``batches`` as ``run`` does, yielding each batch's losses ((blocks, 2):
        L_as, L_ae) as it completes, for a loop of your own::

            for step, losses in enumerate(pipeline.train(loader)):
                log(step, losses)
                if step == 999:
                    break   # the batches already started finish; then the run ends

        Leaving the loop (break, an exception) stops the run gracefully: every block ends
        having trained on the same batches. The run goes on in a helper thread while the loop
        body runs, at most ``lookahead + max_in_flight + 1`` batches beyond those the loop
        has taken, so a slow loop body slows training and a break stops it soon;
        ``last_run`` holds its PipelineRun afterwards.
        """
        results: queue.Queue[Any] = queue.Queue(maxsize=self.max_in_flight)
        stop, abort = threading.Event(), threading.Event()
        done = object()

        def on_batch(index: int, losses: Tensor) -> bool:
            if not stop.is_set():
                results.put(losses)  # waits while the loop is max_in_flight batches behind
            return stop.is_set()

        def target() -> None:
            try:
                self.run(batches, on_batch=on_batch, should_abort=abort.is_set, max_unreported=self.lookahead)
                results.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
                results.put(exc)

        def finish(deadline: float = math.inf) -> None:
            stop.set()
            while worker.is_alive() and time.monotonic() < deadline:  # drained, so that no put waits for a
                try:                                                   # reader that has left
                    results.get(timeout=0.05)
                except queue.Empty:
                    pass

        worker = threading.Thread(target=target, name="al_ext-pipeline", daemon=True)
        worker.start()
        _OPEN_STREAMS.add(finish)
        try:
            while True:
                item = results.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        except KeyboardInterrupt:
            abort.set()
            raise
        finally:
            finish()
            _OPEN_STREAMS.discard(finish)


def _count(value: Any, name: str) -> int:
    """A positive integer the C++ scheduler takes (a C int)."""
    if check_positive_int(value, name) >= 2**31:
        raise ValueError(f"{name} must be below 2**31, got {value}")
    return value


def _check_ownership(model: AssociatedLearning, optimizers: list[Any], schedulers: list[Any]) -> None:
    """The optimisers must be the model's, in its order: one fused optimiser per block, or per
    block one over (f, b) and one over (g, h); scheduler j, where given, steps optimiser j.
    Anything else trains other parameters, or these at each other's rates, with no error."""
    for j, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizers[{j}] must be a torch.optim.Optimizer, got {type(opt).__name__}")
    pairs = model.parameter_groups()
    if len(optimizers) == model.depth:
        expected = [[*fb, *gh] for fb, gh in pairs]
        what = "block {block}'s f, b, g and h"
    elif len(optimizers) == 2 * model.depth:
        expected = [part for pair in pairs for part in pair]
        what = "block {block}'s {part}"
    else:
        return  # the count's own error follows
    for j, (opt, params) in enumerate(zip(optimizers, expected)):
        if not holds_exactly(opt, params):
            block, part = (j + 1, None) if len(optimizers) == model.depth else (j // 2 + 1, ("f and b", "g and h")[j % 2])
            raise ValueError(f"optimizers[{j}] must hold exactly {what.format(block=block, part=part)} parameters "
                             "(the model's parameter_groups(), in block order), and holds a different set")
    for j, (scheduler, opt) in enumerate(zip(schedulers, optimizers)):
        if scheduler is not None:  # the pipeline steps its schedulers after every batch
            check_scheduler(scheduler, opt, f"schedulers[{j}]",
                            f"optimizers[{j}] (one scheduler per optimiser, in the same order)", per_step=True)


def losses_backward(model: AssociatedLearning, optimizers: Sequence[torch.optim.Optimizer], i: int, s: Tensor,
                    t: Tensor, precision: Precision) -> reference.BlockLosses:
    """Block i's forward pass and local losses, and their gradients in its parameters' .grad."""
    for opt in optimizers:
        opt.zero_grad()
    with precision.autocast():  # per thread: each stage enters it itself
        out = reference.local_losses(model.blocks[i], s, t, model.variant, model.ae_loss_of(i))
    (out.loss_as + out.loss_ae).backward()
    return out


def python_block_step(model: AssociatedLearning, index: int, pair: Sequence[torch.optim.Optimizer],
                      schedulers: Sequence[Scheduler | None], precision: Precision
                      ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Block ``index``'s step through autograd and its pair of torch optimisers (and their
    per-step schedulers), as the scheduler's stages call it: (s_prev, t_prev) -> (s, t,
    L_as, L_ae)."""
    def step(s_prev: Tensor, t_prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = losses_backward(model, pair, index, s_prev, t_prev, precision)
        # A non-finite loss changes nothing, as in the fused step: the scheduler reports it.
        if bool(torch.isfinite(out.loss_as) & torch.isfinite(out.loss_ae)):
            for opt in pair:
                opt.step()
            for scheduler in schedulers:
                if scheduler is not None:
                    scheduler.step()
        return out.s.detach(), out.t.detach(), out.loss_as.detach(), out.loss_ae.detach()

    return step


def stepped_rates(scheduler: Scheduler | None, opt: FusedBlockOptimizer) -> Callable[[], tuple[float, float]] | None:
    """For a fused block's step in the scheduler: steps its scheduler and returns the new
    rates of (f, b) and (g, h); None without a scheduler."""
    if scheduler is None:
        return None

    def next_lrs() -> tuple[float, float]:
        scheduler.step()
        fb, gh = opt.param_groups
        return fb["lr"], gh["lr"]

    return next_lrs


def _block_devices(model: AssociatedLearning) -> list[torch.device]:
    return [next(block.parameters()).device for block in model.blocks]


def _cuda_devices(devices: Sequence[str | torch.device]) -> list[torch.device]:
    if isinstance(devices, (str, torch.device)) or len(devices) == 0:
        raise ValueError(f"devices must be a non-empty list of CUDA devices, got {devices!r}")
    out = []
    for d in devices:
        device = torch.device(d)
        if device.type != "cuda":
            raise ValueError(f"devices must be CUDA devices (the CPU pipeline uses threads), got {device}")
        if not torch.cuda.is_available():
            raise ValueError(f"devices names {device}, but torch sees no CUDA device here")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"devices names {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        out.append(torch.device("cuda", index))
    return out


def _place_blocks(model: AssociatedLearning, optimizers: Sequence[torch.optim.Optimizer],
                  devices: list[torch.device], costs: list[float]) -> None:
    """Moves consecutive groups of blocks, balanced by cost, one group to each device, and
    the optimisers' per-parameter state with them (the step counters stay on the CPU)."""
    starts = _C.balanced_groups(costs, len(devices))
    for device, first, end in zip(devices, starts, [*starts[1:], model.depth]):
        for block in model.blocks[first:end]:
            block.to(device)  # keeps the Parameter objects, so the optimisers still hold them
    for opt in optimizers:
        for param, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "step":
                    state[key] = value.to(param.device)
