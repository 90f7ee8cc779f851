"""Trainer: one loop (epochs, batches, validation, hooks, checkpoints, progress) for every
engine (al_ext.engines): Associated Learning through autograd, fused or pipelined, and
ordinary networks trained end to end, so that AL and its BP baseline are measured alike."""
from __future__ import annotations

import collections
import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .callbacks import HOOKS
from .distributed.config import DistributedConfig, init_process_group
from .collapse import collapse_warning
from .label_warmup import label_side_ready, warm_up_label_side, warm_up_problem
from .engines import Engine, PipelinedALEngine, make_engine
from .pipeline import Pipeline, PipelineError
from .errors import NonFiniteLossError
from .nn import AssociatedLearning, check_token_batch, evaluating
from .precision import make_precision
from .optim import (SCHEDULER_INTERVALS, OptimizerSpec, ScheduleName, SchedulerFactory, named_schedule, neco_lr_factor,
                    optimizer_factory)
from .validation import (
    check_batch_pair,
    check_choice,
    check_finite,
    check_float_tensor,
    check_labels,
    check_output_path,
    classes_of,
    first_parameter,
    check_positive_float,
    check_positive_int,
    check_tensor,
)

Data = Union[tuple[Tensor, Tensor], DataLoader]
CHECKPOINT_FORMAT = "al_ext.checkpoint/2"

__all__ = ["Trainer", "neco_lr_factor"]


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return dev


class Trainer:
    """Trains an ``AssociatedLearning`` model with its local losses, or any classifier
    ``nn.Module`` end to end with cross-entropy.

    ``optimizer``: "adam", "adamw", "sgd" (with ``momentum``; ``weight_decay`` for any name),
    or a callable ``(params, lr) -> torch.optim.Optimizer``. AL gets one per block over
    (f, b) with ``lr`` and one over (g, h) with ``ae_lr`` (2 x lr by default); BP one over
    all parameters. Dense blocks train with one fused op per block (the model's backend
    decides) when the optimiser is Adam, AdamW or SGD; any other takes the general path.

    ``scheduler``: a callable ``optimizer -> LRScheduler``, applied to every optimiser and
    stepped after every batch (``scheduler_interval="epoch"``: after every epoch;
    ReduceLROnPlateau then steps on the validation accuracy). ``schedule`` names the NECO
    code's per-epoch schedules instead: "neco" (x0.1 at 40/60/80 % of the run, x0.5 at 90 %)
    or "plateau".

    ``precision``: "fp32", "bf16" (bf16 compute over float32 master weights, optimiser state
    and losses: the fused dense step's bf16 GEMMs where the hardware has them, else autocast
    on the general path) or "fp16" (CUDA only, with loss scaling); al_ext.precision says
    more. ``compile=True`` runs the general path's forward pass and local losses (one graph for
    every block), or the BP network, through torch.compile.

    On the CPU the engine puts a model's convolution weights in channels_last, in place (the
    same values and parameters: al_ext.memory_format), which oneDNN runs faster.

    ``label_warmup`` (AL only; on unless False): the first ``fit`` of a fresh run (one that
    has not stepped or loaded a checkpoint) first trains the label side alone, on the class
    codes, until it tells every class apart at every depth, about as well at each
    (al_ext.label_warmup: a sigmoid label side otherwise holds the full path at chance for
    its first few hundred steps, at any batch size). Its steps and seconds are in the first
    epoch's record (``label_warmup_steps``, ``label_warmup_time_s``) and in
    ``label_warmup_result``.

    ``pipeline=True`` (AL only) trains every block at once on consecutive batches
    (al_ext.Pipeline, with ``max_in_flight``, ``threads_per_stage``, ``pipeline_stages``,
    ``pipeline_shared`` (its ``shared``: on the CPU the workers share the blocks unless False)
    and, on CUDA, ``cuda_graphs``); the parameters are those of the sequential loop, per-step
    schedules included. ``callbacks``: objects with ``on_step``, ``on_validation`` and
    ``on_epoch`` (al_ext.callbacks). ``distributed`` (al_ext.distributed.DistributedConfig),
    under torchrun: this process trains its share of the run, every process running the same
    script with the same model, seed and data (the first stage alone reads the training
    batches; ``batch_size`` is the global batch); checkpoints are written by rank 0 alone.
    ``seed`` fixes the order of the batches of tensor data;
    a DataLoader shuffles from torch's global generator (whose state checkpoints keep), or
    from its own ``generator=``, which checkpoints do not keep.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        ae_lr: float | None = None,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        seed: int = 0,
        schedule: ScheduleName | None = None,
        progress: bool | None = None,
        eval_batch_size: int = 1024,
        optimizer: OptimizerSpec = "adam",
        momentum: float = 0.9,
        weight_decay: float | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        pipeline: bool = False,
        max_in_flight: int = 2,
        threads_per_stage: int | None = None,
        pipeline_stages: int | None = None,
        pipeline_shared: bool | None = None,
        cuda_graphs: bool = False,
        callbacks: Sequence[Any] | None = (),
        precision: str = "fp32",
        compile: bool = False,
        distributed: DistributedConfig | None = None,
        label_warmup: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if label_warmup is not None and not isinstance(label_warmup, bool):
            raise TypeError(f"label_warmup must be True, False or None (on for AL models), got {label_warmup!r}")
        if label_warmup and not isinstance(model, AssociatedLearning):
            raise ValueError("label_warmup=True trains an AL model's label side; this model is trained end to end")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.lr = check_positive_float(lr, "lr")
        self.ae_lr = 2.0 * self.lr if ae_lr is None else check_positive_float(ae_lr, "ae_lr")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.eval_batch_size = check_positive_int(eval_batch_size, "eval_batch_size")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if weight_decay is not None and (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
                                         or not weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if not (isinstance(optimizer, str) or callable(optimizer)):
            raise TypeError(f"optimizer must be a name or a callable (params, lr) -> Optimizer, got {optimizer!r}")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be a callable optimizer -> LRScheduler, got {scheduler!r}")
        check_choice(scheduler_interval, "scheduler_interval", SCHEDULER_INTERVALS)
        if schedule is not None:
            if scheduler is not None:
                raise ValueError("give schedule (a named per-epoch schedule) or scheduler (your own), not both")
            scheduler, scheduler_interval = named_schedule(schedule, lambda: self._fit_epochs), "epoch"
        # The other pipeline options may stay when pipeline is switched off (one configuration,
        # run both ways); cuda_graphs changes what runs, so it may not.
        if cuda_graphs and not pipeline:
            raise ValueError("cuda_graphs=True replays the pipeline's block steps; it needs pipeline=True")
        if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, (Sequence, type(None))):
            raise TypeError(f"callbacks must be a list of callbacks, got {type(callbacks).__name__}")
        self.callbacks = list(callbacks or ())
        for i, callback in enumerate(self.callbacks):
            if isinstance(callback, type):  # its hooks would be unbound functions, failing at the first call
                raise TypeError(f"callbacks[{i}] must be a callback object, got the class {callback.__name__} "
                                f"(write {callback.__name__}(...))")
            hooks = {hook: getattr(callback, hook) for hook in HOOKS if hasattr(callback, hook)}
            if not hooks:
                raise TypeError(f"callbacks[{i}] must have at least one of {', '.join(HOOKS)} (al_ext.callbacks."
                                f"Callback), got {type(callback).__name__}")
            for hook, fn in hooks.items():
                if not callable(fn):
                    raise TypeError(f"callbacks[{i}].{hook} must be callable, got {type(fn).__name__}")
        self.schedule = schedule
        self.device = _resolve_device(device)
        made_group = False
        if distributed is not None:
            if not isinstance(distributed, DistributedConfig):
                raise TypeError(f"distributed must be an al_ext.distributed.DistributedConfig, got {distributed!r}")
            self.device = _local_device(self.device)
            made_group = init_process_group(distributed, self.device)
            if torch.distributed.get_rank() != 0:
                progress = False  # one progress bar for the job
        self.progress = progress
        try:
            self.model = model.to(self.device)
            self.is_al = isinstance(model, AssociatedLearning)
            self.num_classes = classes_of(model)
            self._fit_epochs = 1  # the run's length, for the "neco" schedule; set by fit
            pipeline_options = (dict(max_in_flight=max_in_flight, threads_per_stage=threads_per_stage,
                                     stages=pipeline_stages, shared=pipeline_shared, cuda_graphs=cuda_graphs)
                                if pipeline else {})
            self.label_warmup = self.is_al and label_warmup is not False
            self._warmup_pending = self.label_warmup  # until the run steps, loads or warms up
            self.label_warmup_result: dict[str, float] | None = None  # its steps and seconds, once it has run
            self.engine: Engine = make_engine(self.model, optimizer_factory(optimizer, momentum, weight_decay),
                                              self.lr, self.ae_lr, scheduler, scheduler_interval, pipeline,
                                              make_precision(precision, self.model, self.device), bool(compile),
                                              distributed, **pipeline_options)
        except BaseException:
            if made_group:  # a Trainer that failed to build leaves no process group behind
                torch.distributed.destroy_process_group()
            raise
        self.should_stop = False  # set by a callback to end the run after the batches already started
        self._epoch_batch_size: int | None = None  # the batch size of tensor data this epoch began with
        self._generator = torch.Generator().manual_seed(seed)
        # Where the run is: epochs done, batches done in the current epoch, batches in all.
        self.epoch = 0
        self.position = 0
        self.global_step = 0
        self._epoch_start: dict[str, Tensor] | None = None  # RNG states at the start of this epoch
        self._totals: dict[str, Any] = {}  # this epoch's running sums
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"epoch", "val_accuracy"} of the best epoch on validation
        self._best_state: dict[str, Tensor] | None = None
        self._best_path: Path | None = None  # where this fit writes the best weights
        self._best_file: Path | None = None  # where the best weights so far were written
        self._in_run = False  # inside engine.run (a pipelined one cannot be saved then)
        self._blocks_out_of_step = False  # a pipelined run was stopped at once; cleared by a load

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.engine.optimizers

    @property
    def pipeline(self) -> Pipeline | None:
        return self.engine.pipeline if isinstance(self.engine, PipelinedALEngine) else None

    # ---- data -------------------------------------------------------------------------

    def _check_pair(self, x: Any, y: Any, name: str) -> tuple[Tensor, Tensor]:
        vocab_size = getattr(self.model, "vocab_size", None)
        if vocab_size is not None:  # token ids: checked by the model's own rule, which casts them to an index dtype
            x = check_token_batch(check_tensor(x, f"{name} inputs").to(self.device), self.device, vocab_size,
                                  f"{name} inputs")
            return x, check_labels(y, self.num_classes, f"{name} labels", length=x.shape[0]).to(self.device)
        x = check_float_tensor(x, f"{name} inputs")
        y = check_labels(y, self.num_classes, f"{name} labels", length=x.shape[0] if x.dim() else None)
        if x.dim() < 2:
            raise ValueError(f"{name} inputs must have samples along dim 0 and features after, got shape {tuple(x.shape)}")
        x = x.to(dtype=first_parameter(self.model).dtype)  # checked as the model gets it: 1e39 is inf in float32
        check_finite(x, f"{name} inputs")
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _prepared(self, data: Data, name: str) -> Data:
        if isinstance(data, DataLoader):
            return data
        expected = f"{name} must be an (inputs, labels) pair of tensors or a DataLoader"
        if isinstance(data, (tuple, list)) and data and all(isinstance(b, (tuple, list)) for b in data):
            raise TypeError(f"{expected}, got a {type(data).__name__} of {len(data)} pairs (batches? a DataLoader "
                            "yields batches)")
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return self._check_pair(data[0], data[1], name)
        raise TypeError(f"{expected}, got {type(data).__name__}")

    def _batches(self, data: Data, name: str, batch_size: int, shuffle: bool) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches, made one at a time as they are asked for."""
        if isinstance(data, DataLoader):
            for batch in data:
                check_batch_pair(batch, f"each batch of the {name} DataLoader")
                yield self._check_pair(batch[0], batch[1], name)
            return
        x, y = data
        n = x.shape[0]
        order = torch.randperm(n, generator=self._generator).to(self.device) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            yield x[idx], y[idx]

    def _epoch_batches(self, train: Data) -> Iterator[tuple[Tensor, Tensor]]:
        """This epoch's training batches from ``self.position`` on: the order is drawn from the
        RNG states of the epoch's start, so a run resumed mid-epoch sees the batches that the
        uninterrupted run would have."""
        if self._epoch_start is None:
            self._epoch_start = {"generator": self._generator.get_state(), "torch": torch.get_rng_state()}
        now = torch.get_rng_state()
        self._generator.set_state(self._epoch_start["generator"])
        torch.set_rng_state(self._epoch_start["torch"])  # a DataLoader draws its shuffle from torch's RNG
        batches = self._batches(train, "train", self.batch_size, shuffle=True)
        skipped = sum(1 for _ in itertools.islice(batches, self.position))  # one batch in memory at a time
        if skipped < self.position:
            raise ValueError(f"the checkpoint is {self.position} batches into an epoch, but train has {skipped}")
        if self.position:
            torch.set_rng_state(now)
        return batches

    @staticmethod
    def _num_batches(data: Data, batch_size: int) -> int | None:
        """Batches in an epoch; None for a DataLoader over an IterableDataset, which has no length."""
        if isinstance(data, DataLoader):
            try:
                return len(data)
            except TypeError:
                return None
        return -(-data[0].shape[0] // batch_size)

    # ---- training ----------------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One update on one batch. Returns {"loss_as": [...], "loss_ae": [...]} per block for AL,
        {"loss": float} for BP."""
        x, y = self._check_pair(x, y, "batch")
        self._warmup_pending = False  # a run that has stepped is not a fresh one
        return self.engine.loss_record(self.engine.step(x, y))

    def fit(
        self,
        train: Data,
        val: Data | None = None,
        epochs: int = 10,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int | None = None,
        save_best: str | Path | None = None,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in all (so a resumed run continues where it stopped).

        Returns the history, one record per epoch: mean losses (per block for AL), samples/s
        and wall time of the training pass, learning rate, and validation accuracy (per
        shortcut depth for AL) when ``val`` is given. The best epoch on ``val`` is kept in
        ``self.best`` and restored by ``restore_best()`` (``save_best``: its weights are also
        written there); the test split is never looked at. With ``checkpoint``, the state is
        saved there after every epoch, and every ``checkpoint_every`` batches: ``load`` it into
        a new trainer and call ``fit`` with the same arguments to finish an interrupted run
        exactly as it would have finished (pipelined runs drain the pipeline at each
        checkpoint). ``on_epoch(record)`` is called after each epoch, as are the callbacks.
        """
        refusal: Exception | None = None
        try:  # a rank alone may refuse (its data, the writer's paths): every rank hears of it
            train, val = self._checked_fit_arguments(train, val, epochs, on_epoch, checkpoint, checkpoint_every,
                                                     save_best)
        except (TypeError, ValueError) as exc:
            refusal = exc
        self.engine.check_alike_on_every_rank("fit", {
            "epochs": epochs, "val given": val is not None, "checkpoint given": checkpoint is not None,
            "checkpoint_every": checkpoint_every, "save_best given": save_best is not None}, refusal)
        self._fit_epochs = epochs
        self._best_path = None if save_best is None else Path(save_best)
        self.should_stop = False
        try:
            if self._warmup_pending:
                self._warm_up_label_side()
            while self.epoch < epochs and not self.should_stop:
                finished = self._train_epoch(train, epochs, checkpoint, checkpoint_every)
                if not finished:
                    break
                record = self._epoch_record()
                if val is not None:
                    self._validate(val, record)
                self.engine.end_epoch(record.get("val_accuracy"))
                self.epoch += 1
                self.position = 0
                self._epoch_start = None
                self.history.append(record)
                if checkpoint is not None:
                    self.save(checkpoint)
                for callback in self._hooks("on_epoch"):
                    callback(self, record)
                if on_epoch is not None:
                    on_epoch(record)
                self.should_stop = self.engine.agree(self.should_stop)
        except BaseException as exc:
            self.engine.report_failure(exc)  # distributed: so that the other ranks can say what happened
            raise
        return self.history

    def _checked_fit_arguments(self, train: Data, val: Data | None, epochs: int, on_epoch: Any,
                               checkpoint: str | Path | None, checkpoint_every: int | None,
                               save_best: str | Path | None) -> tuple[Data, Data | None]:
        """fit's arguments checked, and its data prepared: (train, val)."""
        check_positive_int(epochs, "epochs")
        if on_epoch is not None and not callable(on_epoch):
            raise TypeError(f"on_epoch must be a callable record -> None, got {type(on_epoch).__name__}")
        if checkpoint_every is not None:
            check_positive_int(checkpoint_every, "checkpoint_every")
            if checkpoint is None:
                raise ValueError("checkpoint_every needs checkpoint= (the file to write)")
        for name, path in (("checkpoint", checkpoint), ("save_best", save_best)):
            if path is not None and self.engine.is_writer:  # the one process that writes them
                check_output_path(path, name)
        if save_best is not None and val is None:
            raise ValueError("save_best needs val= (the best epoch is the best on validation)")
        train = self._prepared(train, "train")
        val = None if val is None else self._prepared(val, "val")
        self._check_batch_size_of_epoch(train)
        return train, val

    def _check_batch_size_of_epoch(self, train: Data) -> None:
        """A run stopped mid-epoch resumes at a batch count, which the batches of tensor data
        only mean at the batch size the epoch began with (a DataLoader makes its own)."""
        batch_size = None if isinstance(train, DataLoader) else self.batch_size
        if self.position and self._epoch_batch_size is not None and batch_size is not None \
                and batch_size != self._epoch_batch_size:
            raise ValueError(f"the run stopped after batch {self.position} of an epoch of batches of "
                             f"{self._epoch_batch_size}; resume it with batch_size={self._epoch_batch_size} (this "
                             f"trainer's is {batch_size}), or from a checkpoint written at the end of an epoch")
        self._epoch_batch_size = batch_size

    def _warm_up_label_side(self) -> None:
        self._warmup_pending = False
        problem = warm_up_problem(self.model)
        if problem is not None:
            warnings.warn(f"the run starts without the label warm-up: {problem} (label_warmup=False starts without "
                          "it and without this warning)", RuntimeWarning, stacklevel=3)
            return
        start = time.perf_counter()
        steps, decodes = warm_up_label_side(self.model)
        self.label_warmup_result = {"label_warmup_steps": steps, "label_warmup_time_s": time.perf_counter() - start}
        if not decodes:
            warnings.warn(f"the label warm-up stopped after {steps} steps with the label side still not telling every "
                          "class apart at every depth; training goes on from there (label_warmup=False starts "
                          "without it)", RuntimeWarning, stacklevel=3)

    def _hooks(self, name: str) -> list[Any]:
        return [getattr(c, name) for c in self.callbacks if hasattr(c, name)]

    def _train_epoch(self, train: Data, total_epochs: int, checkpoint: str | Path | None,
                     checkpoint_every: int | None) -> bool:
        """Trains the rest of the epoch; False if a callback stopped it first."""
        if self.position == 0:
            self._totals = {"losses": None, "samples": 0, "train_time_s": 0.0}
        batches = self._epoch_batches(train)
        total = self._num_batches(train, self.batch_size)
        # progress None: a bar only when writing to a terminal (tqdm's disable=None).
        bar = tqdm(total=total, initial=self.position, desc=f"epoch {self.epoch + 1}/{total_epochs}", unit="batch",
                   leave=False, disable=None if self.progress is None else not self.progress)
        sizes: collections.deque[int] = collections.deque()  # of the batches handed to the engine, not yet reported
        exhausted = [False]

        def counted() -> Iterator[tuple[Tensor, Tensor]]:
            for x, y in batches:
                sizes.append(int(x.shape[0]))
                yield x, y
            exhausted[0] = True

        stream = counted()
        last = [time.perf_counter()]

        # A hook that raised: the batches already started (pipelined: up to one per block) finish
        # and are counted, without hooks, so that the trainer stays one consistent run; then it raises.
        failed: list[BaseException] = []

        def on_batch(_: int, losses: Tensor, samples: int | None = None) -> bool:
            # An engine whose rank does not read the batches says how many samples each held.
            counted = sizes.popleft() if sizes else None
            now = time.perf_counter()
            try:
                self._account(counted if samples is None else samples, losses, now - last[0], bar, hooks=not failed)
            except BaseException as exc:  # noqa: BLE001 - raised once the run has stopped (Ctrl-C in a hook too)
                failed.append(exc)
            last[0] = now
            return bool(failed) or self.should_stop or (checkpoint_every is not None
                                                        and self.position % checkpoint_every == 0)

        try:
            while True:
                before = self.position
                start = time.perf_counter()
                last[0] = start
                self._in_run = True
                try:
                    ended = self.engine.run(stream, on_batch)
                except BaseException as exc:
                    # Pipelined, a run stopped at once (Ctrl-C in the scheduler, a failing block) leaves
                    # the blocks at different batches, a state no save could resume exactly; one whose
                    # batches stopped coming (the loader failed) finished the batches it had started.
                    self._blocks_out_of_step = isinstance(self.engine, PipelinedALEngine) and isinstance(
                        exc, (KeyboardInterrupt, PipelineError, NonFiniteLossError))
                    if isinstance(exc, NonFiniteLossError):
                        raise exc.in_epoch(self.epoch + 1, before + (exc.batch or 0)) from None
                    raise
                finally:
                    self._in_run = False
                if failed:
                    raise failed[0]
                self.should_stop = self.engine.agree(self.should_stop)  # distributed: every rank alike
                self._totals["train_time_s"] += time.perf_counter() - start
                if exhausted[0] or ended or self.position == before:
                    break
                if checkpoint is not None:  # stopped at checkpoint_every, or by a callback
                    self.save(checkpoint)
                if self.should_stop:
                    break
        finally:
            bar.close()
        if self._totals["samples"] == 0:
            raise ValueError("train holds no samples")
        return not self.should_stop or (total is not None and self.position >= total)

    def _account(self, size: int, losses: Tensor, seconds: float, bar: Any, hooks: bool = True) -> None:
        """A batch is done: the epoch's sums, the step hooks (unless not ``hooks``), the progress bar."""
        losses = losses.double()
        t = self._totals
        t["losses"] = losses * size if t["losses"] is None else t["losses"] + losses * size
        t["samples"] += size
        self.position += 1
        self.global_step += 1
        step_hooks = self._hooks("on_step") if hooks else []
        show = not bar.disable
        if step_hooks or show:
            record: dict[str, Any] = {"epoch": self.epoch + 1, "batch": self.position - 1, "step": self.global_step,
                                      "samples": size, "lr": self.engine.lr,
                                      "samples_per_s": size / seconds if seconds > 0 else 0.0}
            record.update(self.engine.loss_record(losses))
            for hook in step_hooks:
                hook(self, record)
            if show:
                bar.set_postfix_str(_progress_text(record), refresh=False)
        bar.update(1)

    def _epoch_record(self) -> dict[str, Any]:
        t = self._totals
        record: dict[str, Any] = {"epoch": self.epoch + 1}
        record.update(self.engine.loss_record(t["losses"] / t["samples"]))
        elapsed = t["train_time_s"]
        record.update(samples_per_s=t["samples"] / elapsed if elapsed > 0 else 0.0, train_time_s=elapsed,
                      lr=self.engine.lr)
        if isinstance(self.engine, PipelinedALEngine):
            record["stage_idle_fraction"] = self.engine.stage_idle_fraction
        if self.epoch == 0 and self.label_warmup_result is not None:
            record.update(self.label_warmup_result)
        return record

    def _validate(self, val: Data, record: dict[str, Any]) -> None:
        metrics = self._evaluate(val, "val")
        record["val_accuracy"] = metrics["accuracy"]
        if self.is_al:
            record["val_shortcut_accuracy"] = metrics["shortcut_accuracy"]
            warning = collapse_warning(record["loss_ae"][0], metrics["shortcut_accuracy"], self.num_classes,
                                       self.model.ae_loss_of(0), label_side_ready(self.model),
                                       warmed_up=self.label_warmup_result is not None)
            if warning is not None:
                record["collapse_warning"] = warning
                warnings.warn(f"epoch {self.epoch + 1}: {warning}", RuntimeWarning, stacklevel=3)
        if self.best is None or metrics["accuracy"] > self.best["val_accuracy"]:
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self._best_path is not None:
                whole = self.engine.full_model_state(self._best_state)
                if self.engine.is_writer:
                    torch.save(whole, self._best_path)
            self.best = {"epoch": self.epoch + 1, "val_accuracy": metrics["accuracy"]}
            self._best_file = self._best_path
        for hook in self._hooks("on_validation"):
            hook(self, {"epoch": self.epoch + 1, **metrics})

    @property
    def best_weights_known(self) -> bool:
        """Whether ``restore_best`` can load the best epoch's weights: kept in memory by this
        trainer's fit, or in the file of ``fit(save_best=...)``. A run resumed from a
        checkpoint knows which epoch was best but keeps its weights only in that file."""
        return self._best_state is not None or self._best_file is not None

    def restore_best(self) -> None:
        """Load the parameters of the best epoch on the validation data (from memory, or after
        ``load`` from the file that ``fit(save_best=...)`` wrote)."""
        if self._best_state is None and self._best_file is not None:
            self._best_state = torch.load(self._best_file, map_location=self.device, weights_only=True)
        if not self.best_weights_known:
            raise RuntimeError("no best epoch is known: pass val= to fit() to select one (and save_best= to keep "
                               "its weights across a resume)")
        self.engine.load_model_state(self._best_state)

    def evaluate(self, data: Data) -> dict[str, Any]:
        """Accuracy on ``data``; for AL also the accuracy of every shortcut depth 1..L
        (``shortcut_accuracy[-1]`` is the full path, equal to ``accuracy``)."""
        return self._evaluate(data, "data")

    def _evaluate(self, data: Data, name: str) -> dict[str, Any]:
        data = self._prepared(data, name)
        with evaluating(self.model):
            correct, samples = self.engine.correct_counts(self._batches(data, name, self.eval_batch_size,
                                                                        shuffle=False))
        if correct is None:
            raise ValueError(f"{name} holds no samples")
        accuracy = (correct.double() / samples).tolist()
        result: dict[str, Any] = {"accuracy": accuracy[-1], "samples": samples}
        if self.is_al:
            result["shortcut_accuracy"] = accuracy
        return result

    def close_callbacks(self) -> None:
        """Closes the callbacks that hold files (the loggers)."""
        for close in self._hooks("close"):
            close()

    # ---- checkpoints -------------------------------------------------------------------

    def _signature(self) -> dict[str, list[int]]:
        return {name: list(t.shape) for name, t in self.model.state_dict().items()}

    def save(self, path: str | Path, sharded: bool = False) -> None:
        """Everything needed to continue the run exactly, from any batch: parameters, optimiser
        and scheduler states, where the run is (epoch, batch, step), this epoch's sums, history,
        best epoch (its weights are in their own file, ``fit(save_best=...)``), and the random
        number generators' states (CPU and CUDA).

        Distributed, every rank calls it: rank 0 writes the whole run to one file, as one
        process would (and loads), or, with ``sharded=True``, every stage writes its own blocks
        into the directory ``path`` through torch.distributed.checkpoint, which a job of any
        number of ranks and stages loads."""
        if self._blocks_out_of_step:
            raise RuntimeError("the pipelined run was stopped at once (Ctrl-C, or a block that failed), with its "
                               "blocks at different batches: no checkpoint could resume it exactly; load() the last "
                               "checkpoint (fit(checkpoint=...) writes them) to continue")
        if self._in_run and isinstance(self.engine, PipelinedALEngine):
            raise RuntimeError("save() was called while the pipeline is running, when its blocks stand at different "
                               "batches: use fit(checkpoint=..., checkpoint_every=N), which drains it first")
        if not sharded and self.engine.is_writer:
            check_output_path(path, "path")
        if sharded:
            if not hasattr(self.engine, "save_sharded"):
                raise ValueError("sharded=True writes the shards of a distributed run; this trainer runs in one "
                                 "process: save(path) writes its checkpoint")
            self.engine.save_sharded(str(path), self._run_state())
            return
        model, engine = self.engine.full_model_state(self.model.state_dict()), self.engine.full_state_dict()
        if self.engine.is_writer:
            torch.save({**self._run_state(), "model": model, "engine": engine}, path)

    def _run_state(self) -> dict[str, Any]:
        """The checkpoint but for the model's and the engine's state."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model_class": type(self.model).__name__,
            "signature": self._signature(),
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self._epoch_batch_size,
            "global_step": self.global_step,
            "label_warmup": self.label_warmup_result,
            "totals": self._totals if self.position else {},
            "epoch_start": self._epoch_start if self.position else None,
            "history": self.history,
            "best": self.best,
            "best_file": None if self._best_file is None else str(self._best_file),
            "generator": self._generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint written by ``save`` for a model of the same architecture,
        trained by the same kind of engine: a file (from one process or a distributed run,
        into either), or the directory of a sharded one (into a distributed run)."""
        if Path(path).is_dir():
            if not hasattr(self.engine, "load_sharded"):
                raise ValueError(f"{path} is a directory (a sharded checkpoint), which a distributed run loads; in "
                                 "one process, load the file that save() without sharded=True writes")
            from .distributed.checkpoint import read_run_state
            run_state = read_run_state(str(path))
            self._check_run_state(run_state, path)  # before any shard is read
            self.engine.load_sharded(str(path))
            self._load_run_state(run_state, path)
            return
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path} is not a readable al_ext checkpoint ({exc})") from exc
        self._check_run_state(ckpt, path)
        self.engine.check_state_matches(ckpt["engine"])  # before anything is loaded: a refused load changes nothing
        self.engine.load_model_state(ckpt["model"])
        self.engine.load_state_dict(ckpt["engine"])
        self._load_run_state(ckpt, path)

    @staticmethod
    def _check_format(ckpt: Any, path: str | Path) -> None:
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else None
            raise ValueError(f"{path} is not an al_ext checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r}; "
                             "a checkpoint of an older al_ext cannot be resumed by this one)")

    def _check_run_state(self, ckpt: Any, path: str | Path) -> None:
        """ValueError unless this trainer can resume ``ckpt``, before anything is loaded."""
        self._check_format(ckpt, path)
        self._check_architecture(ckpt, path)

    def _load_run_state(self, ckpt: dict[str, Any], path: str | Path) -> None:
        """After _check_run_state passed and the model's and the engine's state loaded."""
        self.epoch, self.position, self.global_step = ckpt["epoch"], ckpt["position"], ckpt["global_step"]
        self._blocks_out_of_step = False
        self._epoch_batch_size = ckpt.get("batch_size")  # absent from checkpoints of before it was kept
        self._warmup_pending = False
        self.label_warmup_result = ckpt.get("label_warmup")  # absent from checkpoints of before the warm-up
        self._totals = copy.deepcopy(ckpt["totals"])
        self._epoch_start = ckpt["epoch_start"]
        self.history = copy.deepcopy(ckpt["history"])
        self.best = ckpt["best"]
        self._best_file = None if ckpt["best_file"] is None else Path(ckpt["best_file"])
        self._best_state = None
        self._generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])

    def _check_architecture(self, ckpt: dict[str, Any], path: str | Path) -> None:
        if ckpt["model_class"] != type(self.model).__name__:
            raise ValueError(f"{path} was saved from a {ckpt['model_class']}, but this trainer holds a "
                             f"{type(self.model).__name__}")
        ours, theirs = self._signature(), ckpt["signature"]
        problems = [f"{k}: {theirs.get(k)} in the checkpoint, {ours.get(k)} in this model"
                    for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise ValueError(f"{path} holds a model of another architecture: {shown}")


def _local_device(device: torch.device) -> torch.device:
    """A distributed process's device: an unnumbered "cuda" is the launcher's LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _progress_text(record: dict[str, Any]) -> str:
    if "loss_as" in record:
        losses = f"L_as {' '.join(f'{v:.3f}' for v in record['loss_as'])} L_ae {' '.join(f'{v:.3f}' for v in record['loss_ae'])}"
    else:
        losses = f"loss {record['loss']:.3f}"
    return f"{losses} {record['samples_per_s']:,.0f} samples/s"
