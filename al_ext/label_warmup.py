"""Training the label side alone before the first batch: the label warm-up.

A block's label encoder g_i and decoder h_i never see x: they learn from the labels alone,
through the auto-encoder loss L_ae,i. Yet the bridges can only learn once the label side
tells the classes apart, and a sigmoid label side (NECO's, al_ext's default) needs a few
hundred steps to do so, block after block: on NECO's VGG label side (4 blocks, width 300,
Adam at 5.7e-4) depth 1 decodes every class after about 225 steps, depth 3 after 300 and
depth 4 later still. Since every batch holds every class, those steps do not get fewer at
a larger batch, so at batch 256 a small training set spends its first epochs with the full
path at chance (README, the preset grid).

The warm-up trains (g_i, h_i) on their own losses, on the C class codes (one row per
class), until the label side's round trip, h_1(...h_k(g_k(...g_1(e_c)))), gives back every
class c at every depth k, with the classes' codes at every depth about as far apart as at
the first (label_side_ready). It uses no randomness and no data, so every process of a
distributed run computes the same warm-up, and it leaves f and b as they were. The
architecture stays the preset's; only the label side's starting point moves. Its optimiser
is Adam whatever the run's: it is dropped afterwards, and its rate only sets how many steps
the warm-up takes (SGD at a label side's usual rates would need thousands). Adam moves
every weight by about its rate a step, so a unit's input by about rate x fan-in; the rate
is UNIT_STEP / label width, the same step per unit at any width (1e-3 at NECO's width of
300 for VGG and ResNet; at 1e-3, label sides 8 or 16 wide needed 1500-2000 steps).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .errors import NonFiniteLossError
from .nn import AssociatedLearning, evaluating
from .optim import optimizer_factory
from .validation import check_positive_float, check_positive_int, first_parameter

UNIT_STEP = 0.3  # Adam's rate x the label width: NECO's label sides are ready after 170-330 steps
MAX_STEPS = 5000  # 10 classes take 100-330 steps, 100 classes some 2000
CHECK_EVERY = 10  # steps between checks (each is a forward pass of C rows)
SEPARATION = 0.75  # label_side_ready's: warmed-up tanh label sides keep 0.8-0.9 of depth 1's separation


def _classes(model: AssociatedLearning) -> Tensor:
    return torch.arange(model.num_classes, device=first_parameter(model).device)


def holds_meta_parameters(model: AssociatedLearning) -> bool:
    """Whether some blocks are elsewhere: a distributed run's other stages, on the meta device."""
    return any(p.is_meta for p in model.parameters())


def warm_up_problem(model: AssociatedLearning) -> str | None:
    """Why the warm-up cannot run on ``model`` as it stands, or None."""
    if holds_meta_parameters(model):
        return ("it needs every block's label side in this process, and some parameters are on the meta device (in "
                "a distributed run: the blocks of other stages, once evaluate, predict or save before fit placed them)")
    if any(p.dtype == torch.float16 for p in model.parameters()):
        return ("its Adam state underflows in float16 parameters and the label side never gets ready (keep the "
                "parameters in float32: precision='fp16' computes in float16 on CUDA)")
    return None


def _codes(model: AssociatedLearning) -> list[Tensor]:
    """t_1 .. t_L of the C class codes, one row per class."""
    with evaluating(model):
        t, codes = model.label_targets(_classes(model)), []
        for block in model.blocks:
            t = block.g(t)
            codes.append(t)
    return codes


def _decodes(model: AssociatedLearning, codes: list[Tensor]) -> bool:
    classes = torch.arange(len(codes[0]), device=codes[0].device)  # row c of each code is class c's
    with evaluating(model):
        return all(bool((model.decode(t, depth).argmax(1) == classes).all())
                   for depth, t in enumerate(codes, start=1))


def _closest_pair(t: Tensor) -> float:
    """The distance between the two class codes nearest each other."""
    distances = torch.cdist(t.float(), t.float())
    return float(distances.masked_fill(torch.eye(len(t), dtype=torch.bool, device=t.device), math.inf).min())


def label_round_trip_decodes(model: AssociatedLearning) -> bool | None:
    """Whether every class's one-hot code, encoded by g_1..g_k and decoded by h_k..h_1, comes
    back as that class, at every depth k; None where this process does not hold every block
    (a distributed run's blocks of other stages are on the meta device)."""
    return None if holds_meta_parameters(model) else _decodes(model, _codes(model))


def label_side_ready(model: AssociatedLearning) -> bool | None:
    """Where the warm-up stops: the round trip decodes every class at every depth, and no
    deeper depth has lost most of the classes' separation: at every depth the two nearest
    class codes are at least SEPARATION times as far apart as at the first. The round trip
    alone is not enough: when it first decodes, NECO's deepest codes are still close
    together (ResNet_AL's label side: the nearest two classes 1.2 apart at depth 4, 3.0 at
    depth 1), and the deepest bridge, whose target they are, learns their mean first; a
    hundred steps later they are 5.1 apart. None where this process does not hold every block."""
    if holds_meta_parameters(model):
        return None
    codes = _codes(model)
    first = _closest_pair(codes[0])
    return _decodes(model, codes) and all(_closest_pair(t) >= SEPARATION * first for t in codes[1:])


def warm_up_label_side(model: AssociatedLearning, lr: float | None = None,
                       max_steps: int | None = None) -> tuple[int, bool]:
    """Trains every block's (g, h) on its auto-encoder loss over the C class codes, with a
    fresh Adam per block at ``lr`` (UNIT_STEP / the label width by default; dropped
    afterwards), until ``label_side_ready``, checked every CHECK_EVERY steps, for at most
    ``max_steps`` steps (MAX_STEPS by default).

    Returns (steps taken, whether the label side got ready). Ends with a check, which reads
    the result on the host, so on CUDA every update has run when it returns. A non-finite
    L_ae raises NonFiniteLossError before its block's update."""
    if not isinstance(model, AssociatedLearning):
        raise TypeError(f"model must be an al_ext.AssociatedLearning, got {type(model).__name__}")
    max_steps = MAX_STEPS if max_steps is None else check_positive_int(max_steps, "max_steps")
    problem = warm_up_problem(model)
    if problem is not None:
        raise ValueError(f"the label warm-up cannot run: {problem}")
    lr = UNIT_STEP / _codes(model)[0].shape[-1] if lr is None else check_positive_float(lr, "lr")
    adam = optimizer_factory("adam")
    optimizers = [adam(label_params, lr) for _, label_params in model.parameter_groups()]
    codes = model.label_targets(_classes(model))
    try:
        for step in range(max_steps):
            if step % CHECK_EVERY == 0 and label_side_ready(model):
                return step, True
            _step(model, optimizers, codes)
        return max_steps, bool(label_side_ready(model))
    finally:
        for opt in optimizers:  # no gradient of the warm-up is left for training to find
            opt.zero_grad(set_to_none=True)


def _step(model: AssociatedLearning, optimizers: list[torch.optim.Optimizer], codes: Tensor) -> None:
    t_prev = codes
    for index, (block, opt) in enumerate(zip(model.blocks, optimizers)):
        t = block.g(t_prev)
        try:
            loss = reference.auto_encoder_loss(block.h(t), t_prev, model.ae_loss_of(index))
        except ValueError as exc:  # h's width
            raise ValueError(f"block {index + 1}: {exc}") from exc
        if not bool(loss.isfinite()):
            raise NonFiniteLossError("L_ae", loss.item(), block=index + 1, detail="in the label warm-up")
        opt.zero_grad()
        loss.backward()
        opt.step()
        t_prev = t.detach()
