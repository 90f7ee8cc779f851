"""Engines: what happens to one batch. The Trainer's loop (epochs, batches, validation,
hooks, checkpoints) is written once; an engine trains on the batches it is given:

- ``BPEngine``: any classifier end to end with cross-entropy (the BP baseline);
- ``ALEngine``: an AL model's local losses through autograd, any blocks, any torch optimiser;
- ``FusedALEngine``: each dense block's whole step as one fused op;
- ``PipelinedALEngine``: every block at once on consecutive batches (al_ext.Pipeline).

For a loop of your own: ``engine.step(x, y)`` trains on one batch and returns its losses,
and ``engine.train(batches)`` yields each batch's losses as it completes (pipelined: while
later batches are still training). ``make_engine`` picks the engine the Trainer would.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .errors import NonFiniteLossError
from .fused import FusedBlockAdam, FusedBlockOptimizer, FusedBlockSGD, bf16_compute_available, fused_block_optimizer
from .large_buffers import reusing_large_buffers
from .memory_format import match_state_layouts, use_fastest_memory_format
from .nn import AssociatedLearning
from .optim import (OptimizerFactory, OptimizerSpec, SchedulerFactory, check_scheduler, optimizer_factory,
                    step_scheduler)
from .pipeline import Batch, BatchCallback, Pipeline
from .precision import Precision, make_precision, missing_bf16_hardware
from .validation import (check_batch_pair, check_labels, check_positive_float, check_tensor, classes_of,
                         first_parameter)


class Engine:
    """Trains ``model`` with ``optimizers``; ``schedulers`` (one per optimiser, or none) are
    stepped after every batch when ``scheduler_interval`` is "step", by ``end_epoch``
    otherwise; ``precision`` (al_ext.precision) says how the math runs. Losses come back as
    a float tensor: (blocks, 2) of (L_as, L_ae) for AL, (1,) for BP."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str = "step", precision: Precision | None = None) -> None:
        self.model = model
        self.optimizers = optimizers
        for opt in optimizers:  # whichever way a checkpoint is loaded (al_ext.memory_format)
            opt.register_load_state_dict_post_hook(match_state_layouts)
        self.schedulers = schedulers
        self.scheduler_interval = scheduler_interval
        self.precision = precision or Precision()
        self.num_classes = classes_of(model, required=False)  # what labels and scores are checked against

    @property
    def is_al(self) -> bool:
        return isinstance(self.model, AssociatedLearning)

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One update on one batch (inputs and labels on the model's device); returns its losses.
        A non-finite loss raises NonFiniteLossError, and the step it was found in changes nothing."""
        self.model.train()
        losses = self._step(x, y)
        if self.scheduler_interval == "step":
            for scheduler in self.schedulers:
                scheduler.step()
        return losses

    @reusing_large_buffers()  # the same large tensors, batch after batch (al_ext.large_buffers)
    def run(self, batches: Iterable[Batch], on_batch: BatchCallback) -> bool | None:
        """Trains on each batch in turn, calling ``on_batch(index, losses)`` after each; a true
        result stops the run. Returns True where the engine knows the stream ran out (an
        engine whose rank does not read the batches), None where the caller counts."""
        for index, (x, y) in enumerate(_pairs(batches)):
            try:
                losses = self.step(x, y)
            except NonFiniteLossError as exc:
                raise exc.at_batch(index) from None
            if on_batch(index, losses):
                return None
        return None

    @torch.no_grad()
    def correct_counts(self, batches: Iterable[Batch]) -> tuple[Tensor | None, int]:
        """Correct predictions on ``batches`` (AL: of every shortcut depth 1..L, the full path
        last; BP: one count) and the samples seen; None for no batches."""
        correct: Tensor | None = None
        samples = 0
        for x, y in _pairs(batches):
            scores = [class_scores(s, self.num_classes, len(x)) for s in
                      (self.model.shortcut_scores(x) if self.is_al else [self.model(x)])]
            y = check_labels(y, scores[0].shape[1], "labels", len(x), read_values=False)
            hits = torch.stack([(s.argmax(dim=1) == y).sum() for s in scores])
            correct = hits if correct is None else correct + hits
            samples += x.shape[0]
        return correct, samples

    def agree(self, flag: bool) -> bool:
        """Whether to stop, as every process of the run sees it (here: this one)."""
        return flag

    def check_alike_on_every_rank(self, call: str, arguments: dict[str, Any], refusal: Exception | None) -> None:
        """Raises ``refusal`` (this process's own objection to ``call``, if any), and refuses
        ``call`` where another process of the run objected or was given other ``arguments``
        (those that decide which collectives it joins); here there is no other."""
        if refusal is not None:
            raise refusal

    def report_failure(self, exc: BaseException) -> None:
        """Tells the other processes of the run, if any, why this one fails."""

    # A checkpoint holds the whole run; an engine whose rank holds part of it gathers the rest.
    is_writer = True  # whether this process writes checkpoints

    def full_model_state(self, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The whole model's state, given this process's; None where another process writes."""
        return state

    def full_state_dict(self) -> dict[str, Any] | None:
        """``state_dict()`` of the whole run; None where another process writes."""
        return self.state_dict()

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    def train(self, batches: Iterable[Batch]) -> Iterator[Tensor]:
        """Yields each batch's losses as it completes; leaving the loop stops training."""
        with reusing_large_buffers():
            for x, y in _pairs(batches):
                yield self.step(x, y)

    def end_epoch(self, metric: float | None = None) -> None:
        """Steps the per-epoch schedulers (ReduceLROnPlateau on ``metric``, the validation accuracy)."""
        if self.scheduler_interval == "epoch":
            for scheduler in self.schedulers:
                step_scheduler(scheduler, metric)

    @property
    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def loss_record(self, losses: Tensor) -> dict[str, Any]:
        if self.is_al:
            return {"loss_as": losses[:, 0].tolist(), "loss_ae": losses[:, 1].tolist()}
        return {"loss": float(losses.reshape(()))}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "optimizer_kinds": [optimizer_kind(o) for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers], "precision": self.precision.state_dict()}

    def check_state_matches(self, state: dict[str, Any]) -> None:
        """ValueError unless ``state`` (a state_dict) is one of an engine like this one: as
        many optimisers, of the same kinds (states from before the kinds were saved are
        taken on trust), and as many schedulers."""
        if len(state["optimizers"]) != len(self.optimizers) or len(state["schedulers"]) != len(self.schedulers):
            raise ValueError(f"the state holds {len(state['optimizers'])} optimisers and {len(state['schedulers'])} "
                             f"schedulers; this engine has {len(self.optimizers)} and {len(self.schedulers)} "
                             "(another optimiser, schedule or engine?)")
        kinds = [optimizer_kind(o) for o in self.optimizers]
        saved = state.get("optimizer_kinds", kinds)
        if saved != kinds:
            raise ValueError(f"the state holds {', '.join(sorted(set(saved)))} optimiser states; this engine trains "
                             f"with {', '.join(sorted(set(kinds)))} (pass the optimizer the run was trained with)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_matches(state)
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for scheduler, s in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(s)
        self.precision.load_state_dict(state["precision"])


def optimizer_kind(opt: torch.optim.Optimizer) -> str:
    """What an optimiser's state holds, named by the torch optimiser it is or matches (a fused
    block optimiser keeps the state of the torch optimiser it matches)."""
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, FusedBlockAdam)):
        # one state, but loading it takes the checkpoint's settings: AdamW's decay would be lost
        decoupled = isinstance(opt, torch.optim.AdamW) or opt.defaults.get("decoupled_weight_decay", False)
        return "AdamW" if decoupled else "Adam"
    if isinstance(opt, (torch.optim.SGD, FusedBlockSGD)):
        return "SGD"
    return type(opt).__name__


def _pairs(batches: Iterable[Batch]) -> Iterator[Batch]:
    for batch in batches:
        check_batch_pair(batch, "each batch")
        yield batch


def class_scores(scores: Any, num_classes: int | None, samples: int) -> Tensor:
    """A classifier's output, checked: (samples, num_classes) scores (any number of classes
    where ``num_classes`` is None). Cross-entropy would fail deep inside on too few classes,
    and train silently on too many."""
    if (not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != samples
            or num_classes not in (None, scores.shape[1])):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the model must return class scores of shape (samples, num_classes) = ({samples}, "
                         f"{num_classes if num_classes is not None else 'classes'}), got {got}")
    return scores


class BPEngine(Engine):
    """End to end: softmax cross-entropy of ``model(x)``, one optimiser over every parameter;
    ``compile=True``: the forward pass (and so its backward) through torch.compile."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str = "step", precision: Precision | None = None, compile: bool = False) -> None:
        super().__init__(model, optimizers, schedulers, scheduler_interval, precision)
        self._forward = torch.compile(model) if compile else model

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        (opt,) = self.optimizers
        opt.zero_grad()
        y = check_labels(y, self.num_classes, "y", len(x), read_values=check_tensor(y, "y").device.type == "cpu")
        with self.precision.autocast():
            logits = class_scores(self._forward(x.detach()), self.num_classes, len(x))  # x: data, not a graph to extend
        loss = F.cross_entropy(logits.float(), y)  # the loss in float32 at least, whatever the precision
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError("loss", loss.item())
        self.precision.backward(loss)
        self.precision.step(opt)
        self.precision.update()
        return loss.detach().reshape(1)


class ALEngine(Engine):
    """AL through autograd: every block's (L_as, L_ae) from ``model.local_losses``, one
    backward pass of their sum (the blocks' inputs are detached, so each loss reaches only
    its own block), and per block an optimiser over (f, b) and one over (g, h).
    ``compile=True`` runs every block's forward pass and losses (and so their backward) as one
    torch.compile graph, as a user compiling their own step would: per-block graphs ran
    0.89-0.90x that loop on VGG_AL and ALCNN. The optimisers stay torch's fused ones."""

    def __init__(self, model: AssociatedLearning, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str = "step", precision: Precision | None = None, compile: bool = False) -> None:
        super().__init__(model, optimizers, schedulers, scheduler_interval, precision)
        self._compiled = torch.compile(_all_blocks_forward(model)) if compile else None

    def _block_losses(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        if self._compiled is None:
            return [(b.loss_as, b.loss_ae) for b in self.model.local_losses(x, y)]
        return self._compiled(*self.model.inputs_and_targets(x, y))

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        for opt in self.optimizers:
            opt.zero_grad()
        with self.precision.autocast():
            blocks = self._block_losses(x, y)  # the losses come out in float32 at least
        losses = torch.stack([torch.stack(pair) for pair in blocks]).detach()
        if not bool(torch.isfinite(losses).all()):  # one wait per batch, and nothing updated
            raise NonFiniteLossError.first_in(losses, "no block was updated on this batch")
        self.precision.backward(sum(loss_as + loss_ae for loss_as, loss_ae in blocks))
        for opt in self.optimizers:
            self.precision.step(opt)
        self.precision.update()
        return losses


def _all_blocks_forward(model: AssociatedLearning) -> Callable[[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
    """Every block's forward pass and (L_as, L_ae) as a function of the batch's tensors alone, for torch.compile."""
    variant = model.variant

    def forward(s: Tensor, t: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = []
        for i, block in enumerate(model.blocks):
            losses = reference.local_losses(block, s, t, variant, model.ae_loss_of(i))
            out.append((losses.loss_as, losses.loss_ae))
            s, t = losses.s, losses.t
        return out

    return forward


class FusedALEngine(Engine):
    """One fused op per dense block (FusedBlockAdam or FusedBlockSGD): forward, both local
    losses, every gradient and the update."""

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        s, t = self.model.inputs_and_targets(x, y)
        # On CUDA each block's kernel refuses a non-finite step by itself, so the losses are
        # read once for the whole batch (one wait for the GPU), not after every block.
        on_cuda = s.is_cuda
        losses = []
        for i, opt in enumerate(self.optimizers):
            try:
                s, t, loss_as, loss_ae = opt.train_step(s, t, check_finite=not on_cuda)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(exc.loss, exc.value, block=i + 1, detail=_updated_before(i)) from None
            losses.append(torch.stack([loss_as, loss_ae]))
        values = torch.stack(losses)
        if on_cuda and not bool(torch.isfinite(values).all()):
            error = NonFiniteLossError.first_in(values)
            raise NonFiniteLossError(error.loss, error.value, error.block,
                                     detail=_updated_before(error.block - 1) + "; later blocks trained on its outputs "
                                     "only where their own losses were finite")
        return values


def _updated_before(block: int) -> str:
    return f"blocks 1-{block} were updated on this batch" if block else ""


class PipelinedALEngine(Engine):
    """Every block at once on consecutive batches, in the C++ scheduler (al_ext.Pipeline),
    with the parameters of the sequential loop. Per-step schedulers are stepped by the worker
    that runs their block."""

    def __init__(self, model: AssociatedLearning, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
                 scheduler_interval: str = "step", precision: Precision | None = None, **pipeline_options: Any) -> None:
        super().__init__(model, optimizers, schedulers, scheduler_interval, precision)
        per_step = schedulers if scheduler_interval == "step" and schedulers else None
        self.pipeline = Pipeline(model, optimizers, schedulers=per_step, precision=self.precision, **pipeline_options)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        self.model.train()
        return self.pipeline.run([(x, y)]).losses[0]

    def run(self, batches: Iterable[Batch], on_batch: BatchCallback) -> None:
        self.model.train()
        # No further ahead of on_batch than a full pipeline, so that a stop it asks for (a
        # callback's should_stop, a checkpoint) comes after the batches already started, not
        # after whatever a busy machine let the stages run through meanwhile.
        self.pipeline.run(batches, on_batch=on_batch, max_unreported=self.pipeline.lookahead)

    def train(self, batches: Iterable[Batch]) -> Iterator[Tensor]:
        self.model.train()
        return self.pipeline.train(batches)

    @property
    def stage_idle_fraction(self) -> list[float]:
        run = self.pipeline.last_run
        return [] if run is None else [s["idle_fraction"] for s in run.stages]


def _fused_optimizers(model: AssociatedLearning, torch_optimizers: list[torch.optim.Optimizer],
                      precision: Precision, compile: bool) -> list[FusedBlockOptimizer] | str:
    """The fused optimisers that do what the torch ones would, or why there are none. bf16: the
    fused step's bf16 GEMMs over float32 master weights, on a CPU that multiplies bf16 in
    hardware or a GPU with bf16 tensor cores (elsewhere the general path, autocast, is as fast
    or faster)."""
    if precision.name == "fp16":
        return "the fused dense step has no fp16 kernel (fp16 needs loss scaling; use precision='bf16')"
    if precision.compute_dtype is not None:
        device = first_parameter(model).device
        if not bf16_compute_available(device):
            reason = missing_bf16_hardware(device) or f"the fused step has no bf16 kernel on {device.type} here"
            return f"{reason} for the fused bf16 step; the general path runs bf16 under autocast"
    if compile:
        return "compile=True compiles the general path (the fused step is one op already)"
    try:
        return [fused_block_optimizer(block, torch_optimizers[2 * i], torch_optimizers[2 * i + 1], model.variant,
                                      model.ae_loss_of(i), precision.compute_dtype)
                for i, block in enumerate(model.blocks)]
    except ValueError as exc:
        return str(exc)


def make_engine(model: nn.Module, optimizer: OptimizerSpec, lr: float, ae_lr: float | None = None,
                scheduler: SchedulerFactory | None = None, scheduler_interval: str = "step",
                pipeline: bool = False, precision: Precision | str = "fp32", compile: bool = False,
                distributed: Any = None, **pipeline_options: Any) -> Engine:
    """The engine for ``model`` (on its device): BP for a plain classifier; for AL the fused
    engine where the model's backend takes it (dense blocks; "auto" on the CPU), the optimiser
    has a fused form (Adam, AdamW, SGD), the precision is fp32 (or bf16 on a CPU with bf16
    hardware or a GPU with bf16 tensor cores: the fused step's bf16 GEMMs over float32 master
    weights) and no schedule cycles momentum,
    else autograd; pipelined if ``pipeline``. ``optimizer``: a name ("adam", "adamw", "sgd")
    or a callable ``(params, lr) -> Optimizer`` (AL: (f, b) with ``lr``, (g, h) with ``ae_lr``,
    2 x lr by default); ``scheduler(opt)``, if given, makes a scheduler for each. ``compile=True``
    compiles every block's forward pass and losses as one graph (ALEngine), or the network's
    forward pass (BP).
    ``distributed`` (an al_ext.distributed.DistributedConfig, inside a launched job): this
    rank's share of a run across processes (al_ext.distributed.DistributedALEngine). On the
    CPU a model with convolutions gets its 4-D weights in channels_last, in place
    (al_ext.memory_format)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = first_parameter(model).device
    factory = optimizer_factory(optimizer)
    lr = check_positive_float(lr, "lr")
    ae_lr = 2.0 * lr if ae_lr is None else check_positive_float(ae_lr, "ae_lr")
    if isinstance(precision, str):
        precision = make_precision(precision, model, device)
    use_fastest_memory_format(model)
    if not isinstance(model, AssociatedLearning):
        if pipeline or distributed is not None:
            what = "pipeline=True" if pipeline else "distributed="
            raise ValueError(f"{what} trains the blocks of an AssociatedLearning model; this model has none")
        optimizers = [factory(model.parameters(), lr)]
        schedulers = _schedulers(scheduler, optimizers, scheduler_interval)
        return BPEngine(model, optimizers, schedulers, scheduler_interval, precision, compile)
    if distributed is not None and (pipeline or compile):
        raise ValueError(f"distributed= runs each rank's blocks one after another; it does not take "
                         f"{'pipeline=True' if pipeline else 'compile=True'} (the ranks are the pipeline's stages)")
    if compile and pipeline:
        raise ValueError("compile=True compiles the sequential engine's step, every block in one graph; the "
                         "pipeline runs the blocks apart and uncompiled (use one or the other)")
    optimizers: list[Any] = _al_optimizers(model, factory, lr, ae_lr)
    schedulers: list[Any] | None = None
    if model.uses_fused_step():
        fused = _fused_optimizers(model, optimizers, precision, compile)
        if isinstance(fused, list):
            fused_schedulers = _schedulers(scheduler, fused, scheduler_interval)
            if any(getattr(s, "cycle_momentum", False) for s in fused_schedulers):
                fused = ("a schedule that cycles momentum (OneCycleLR or CyclicLR with cycle_momentum=True) changes "
                         "the betas or momentum that the fused step holds for a run")
            else:
                optimizers, schedulers = fused, fused_schedulers
        if isinstance(fused, str) and model.backend == "fused":
            raise ValueError(f"backend='fused' cannot train this way: {fused}. The general path takes any torch "
                             "optimiser and precision: build the model with backend='reference' (or 'auto', which "
                             "falls back)")
    if schedulers is None:
        schedulers = _schedulers(scheduler, optimizers, scheduler_interval)
    if distributed is not None:
        from .distributed.engine import DistributedALEngine  # which imports this module
        return DistributedALEngine(model, optimizers, schedulers, scheduler_interval, precision, distributed)
    if pipeline:
        return PipelinedALEngine(model, optimizers, schedulers, scheduler_interval, precision, **pipeline_options)
    if isinstance(optimizers[0], FusedBlockOptimizer):
        return FusedALEngine(model, optimizers, schedulers, scheduler_interval, precision)
    return ALEngine(model, optimizers, schedulers, scheduler_interval, precision, compile)


def _al_optimizers(model: AssociatedLearning, factory: OptimizerFactory, lr: float, ae_lr: float
                   ) -> list[torch.optim.Optimizer]:
    return [opt for fb, gh in model.parameter_groups() for opt in (factory(fb, lr), factory(gh, ae_lr))]


def _schedulers(factory: SchedulerFactory | None, optimizers: list[torch.optim.Optimizer], interval: str) -> list[Any]:
    """``factory(opt)`` for each optimiser, each checked before any training: a scheduler of
    that optimiser, which a step with no argument moves where ``interval`` is "step"."""
    if factory is None:
        return []
    if not callable(factory):
        raise TypeError(f"scheduler must be a callable optimizer -> LRScheduler, got {type(factory).__name__}")
    schedulers = []
    for opt in optimizers:
        made = factory(opt)
        check_scheduler(made, opt, "what scheduler(optimizer) returned", "the optimizer it is given",
                        per_step=interval == "step")
        schedulers.append(made)
    return schedulers
