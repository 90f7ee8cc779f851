"""Optimisers and learning-rate schedules as the Trainer takes them: a name or a callable
``(params, lr) -> torch.optim.Optimizer``, and a callable ``optimizer -> LRScheduler``,
applied to every optimiser the engine makes (one per block side for AL)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

import torch
import torch.optim.optimizer as torch_optimizer_module
from torch import nn

from .validation import check_choice

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
OptimizerSpec = Union[str, OptimizerFactory]
ScheduleName = Literal["neco", "plateau"]
SCHEDULES: tuple[str, ...] = ("neco", "plateau")
SCHEDULER_INTERVALS: tuple[str, ...] = ("step", "epoch")

# The names the Trainer and the CLI take, with torch's defaults (AdamW: weight decay 0.01).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}


def optimizer_factory(spec: OptimizerSpec, momentum: float = 0.9, weight_decay: float | None = None) -> OptimizerFactory:
    """A name ("adam", "adamw", "sgd" with ``momentum``; ``weight_decay`` where given), as
    torch's fused implementation where it has one, or a callable
    ``(params, lr) -> Optimizer``, as a callable."""
    if callable(spec):
        if weight_decay is not None:
            raise ValueError("weight_decay goes with an optimizer name; a callable optimizer sets its own")
        return spec
    cls = OPTIMIZERS[check_choice(spec, "optimizer", tuple(OPTIMIZERS))]
    extra: dict[str, Any] = {} if weight_decay is None else {"weight_decay": weight_decay}
    if cls is torch.optim.SGD:
        extra["momentum"] = momentum

    def make(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        params = list(params)
        return cls(params, lr=lr, fused=_fused_kernels_fit(params), **extra)

    return make


def _fused_kernels_fit(params: list[nn.Parameter]) -> bool | None:
    """torch's fastest implementation of a named optimiser: its fused kernels (one launch or
    one pass for every tensor; 7x the default Adam on 25 M parameters on this project's CPU)
    where torch has them for the parameters' device, else its default."""
    supported = getattr(torch_optimizer_module, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    devices = supported()
    fits = bool(params) and all(p.device.type in devices and p.dtype.is_floating_point for p in params)
    return True if fits else None


def neco_lr_factor(epoch: int, total_epochs: int) -> float:
    """The NECO step schedule: x0.1 at 40, 60 and 80 % of the run, then x0.5 at 90 %."""
    progress = epoch / total_epochs
    factor = 1.0
    for milestone, step in ((0.4, 0.1), (0.6, 0.1), (0.8, 0.1), (0.9, 0.5)):
        if progress >= milestone:
            factor *= step
    return factor


def named_schedule(name: str, total_epochs: Callable[[], int]) -> SchedulerFactory:
    """The per-epoch schedules of the NECO code: "neco" (step decay over the run, whose length
    ``total_epochs()`` gives when it is stepped) and "plateau" (x0.1 when validation
    accuracy stalls for 5 epochs)."""
    check_choice(name, "schedule", SCHEDULES)
    if name == "neco":
        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: neco_lr_factor(e, total_epochs()))
    return lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=5)


def step_scheduler(scheduler: Any, metric: float | None) -> None:
    """One scheduler step; ReduceLROnPlateau steps on the validation accuracy, and only when
    there is one."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if metric is not None:
            scheduler.step(metric)
    else:
        scheduler.step()


def holds_exactly(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> bool:
    """Whether ``opt``'s parameter groups hold exactly ``params`` (in any order)."""
    return {id(p) for group in opt.param_groups for p in group["params"]} == {id(p) for p in params}


def check_scheduler(scheduler: Any, opt: torch.optim.Optimizer, name: str, opt_name: str, per_step: bool) -> None:
    """A scheduler must step the optimiser it is paired with; stepped after every batch
    (``per_step``), it must not need a metric (ReduceLROnPlateau does)."""
    if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "state_dict", None))) \
            or isinstance(scheduler, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a learning-rate scheduler (step, state_dict), got {type(scheduler).__name__}")
    if getattr(scheduler, "optimizer", opt) is not opt:
        raise ValueError(f"{name} must step {opt_name}")
    if per_step and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(f"{name} is a ReduceLROnPlateau, which steps on a validation metric once an epoch, not after "
                         "every batch (scheduler_interval='epoch' in the Trainer and make_engine)")
