"""The executable specification of Associated Learning, in plain PyTorch.

One block's training forward pass, its two local losses and their gradients, for
variants A and B (../shared/design/associated-learning.md). Every fused kernel is
tested against these functions, and the model's own training path calls them.

Block i maps (s_{i-1}, t_{i-1}), both detached, to

    s_i = f_i(s_{i-1})      t_i = g_i(t_{i-1})
    L_as = MSE(b_i(s_i), t_i)            (t_i detached in variant A)
    L_ae = MSE(h_i(t_i), t_{i-1})        (or cross-entropy for the first block)

Variant A: L_as updates (f, b) and L_ae updates (g, h).
Variant B: L_as also updates g (its target t_i is not detached).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_choice

Variant = Literal["A", "B"]
AELoss = Literal["mse", "cross_entropy"]
VARIANTS: tuple[str, ...] = ("A", "B")
AE_LOSSES: tuple[str, ...] = ("mse", "cross_entropy")
MseFunction = Callable[[Tensor, Tensor], Tensor]


class BlockModules(Protocol):
    """What the specification needs of a block: its four parts."""

    f: nn.Module
    g: nn.Module
    b: nn.Module
    h: nn.Module

    def named_parameters(self, prefix: str = "", recurse: bool = True): ...


def parameter_groups(block: BlockModules) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters of f and b, parameters of g and h): L_as trains the first, L_ae the
    second, each with an optimiser of its own."""
    return [*block.f.parameters(), *block.b.parameters()], [*block.g.parameters(), *block.h.parameters()]


@dataclass
class BlockLosses:
    """A block's outputs and local losses, still attached to its parameters' graph."""

    s: Tensor
    t: Tensor
    loss_as: Tensor
    loss_ae: Tensor


@dataclass
class BlockGradients:
    """A block's outputs, losses and the gradient of each loss for the parameters it updates."""

    s: Tensor
    t: Tensor
    loss_as: Tensor
    loss_ae: Tensor
    grads_as: dict[str, Tensor]
    grads_ae: dict[str, Tensor]

    def total(self) -> dict[str, Tensor]:
        """Each parameter's gradient as one backward pass of L_as + L_ae leaves it in .grad."""
        total = dict(self.grads_ae)
        for name, grad in self.grads_as.items():
            total[name] = total[name] + grad if name in total else grad
        return total


def one_hot_targets(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """t_0: the label side's input, one row of num_classes per sample."""
    return F.one_hot(labels, num_classes).to(dtype)


def local_losses(
    block: BlockModules,
    s_prev: Tensor,
    t_prev: Tensor,
    variant: Variant = "A",
    ae_loss: AELoss = "mse",
    mse: MseFunction = F.mse_loss,
) -> BlockLosses:
    """Forward pass of one block and its two local losses.

    The inputs are detached here, so no gradient ever reaches the block below.
    ``ae_loss="cross_entropy"`` (first block only) treats h's output as class logits
    and ``t_prev`` as one-hot targets. ``mse`` is the MSE implementation to use. The losses
    are float32 at least, also when the block runs under bf16 autocast.
    """
    check_choice(variant, "variant", VARIANTS)
    s_prev, t_prev = s_prev.detach(), t_prev.detach()
    s = _output_of(block.f, s_prev, "the encoder f")
    t = _output_of(block.g, t_prev, "the label encoder g")
    target = t.detach() if variant == "A" else t
    bridged = _output_of(block.b, s, "the bridge b")
    _check_same_shape(bridged, t, "the bridge b's output", "the label encoder g's")
    loss_as = mse(_at_least_float32(bridged), _at_least_float32(target))
    loss_ae = auto_encoder_loss(_output_of(block.h, t, "the decoder h"), t_prev, ae_loss, mse)
    return BlockLosses(s, t, loss_as, loss_ae)


def _output_of(part: Callable[[Tensor], Any], x: Tensor, name: str) -> Tensor:
    out = part(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return one tensor, got {type(out).__name__} (a module that returns more, as "
                        "nn.LSTM does, needs a wrapper that picks the tensor to pass on)")
    return out


def _check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    """A loss of two tensors of different shapes would broadcast them, and train on garbage."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {tuple(a.shape)}, {b_name} {tuple(b.shape)}: a local loss compares "
                         "them, so their widths must agree")


def auto_encoder_loss(decoded: Tensor, t_prev: Tensor, ae_loss: AELoss = "mse", mse: MseFunction = F.mse_loss) -> Tensor:
    """L_ae: h's output against the block's label input t_prev, in float32 at least; under
    ``ae_loss="cross_entropy"`` h's output is class logits and t_prev one-hot targets."""
    check_choice(ae_loss, "ae_loss", AE_LOSSES)
    _check_same_shape(decoded, t_prev, "the decoder h's output", "its target, the block's label input,")
    decoded, t_prev = _at_least_float32(decoded), _at_least_float32(t_prev)
    return mse(decoded, t_prev) if ae_loss == "mse" else F.cross_entropy(decoded, t_prev)


def _at_least_float32(x: Tensor) -> Tensor:
    """Losses are computed in float32 at least: under bf16 autocast the blocks' outputs are
    bfloat16 (in float32 and float64 this is no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def updated_parameters(block: BlockModules, variant: Variant) -> tuple[list[str], list[str]]:
    """Names of the parameters that L_as and that L_ae update, in the block's order."""
    parts_as = ("f", "b", "g") if variant == "B" else ("f", "b")
    names = [name for name, _ in block.named_parameters()]
    as_names = [n for n in names if n.split(".", 1)[0] in parts_as]
    ae_names = [n for n in names if n.split(".", 1)[0] in ("g", "h")]
    return as_names, ae_names


def local_gradients(
    block: BlockModules,
    s_prev: Tensor,
    t_prev: Tensor,
    variant: Variant = "A",
    ae_loss: AELoss = "mse",
) -> BlockGradients:
    """Outputs, losses and per-loss gradients of one block (plain torch.autograd.grad)."""
    losses = local_losses(block, s_prev, t_prev, variant, ae_loss)
    params = dict(block.named_parameters())
    as_names, ae_names = updated_parameters(block, variant)

    def grads(loss: Tensor, names: list[str], retain: bool) -> dict[str, Tensor]:
        found = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=retain, allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, found)}

    grads_as = grads(losses.loss_as, as_names, retain=True)
    grads_ae = grads(losses.loss_ae, ae_names, retain=False)
    return BlockGradients(
        losses.s.detach(), losses.t.detach(), losses.loss_as.detach(), losses.loss_ae.detach(), grads_as, grads_ae
    )


# ---- the dense (MLP) block, as the fused op al_ext::dense_block_step computes it ----------

DENSE_PARAMETER_NAMES: tuple[str, ...] = ("W_f", "c_f", "W_b1", "c_b1", "W_b2", "c_b2", "W_g", "c_g", "W_h", "c_h")
# The x-side activations by name, as modules: the one table that the model builders, the
# fused block's layout check and the CLI read.
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"elu": nn.ELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
X_ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATION_MODULES)


def activation_module(name: str) -> type[nn.Module]:
    """The module class of an x-side activation named ``name`` (one of X_ACTIVATIONS)."""
    return ACTIVATION_MODULES[check_choice(name, "activation", X_ACTIVATIONS)]


H_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "identity")
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": F.elu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda z: z,
}


@dataclass
class DenseBlockStep:
    """What al_ext::dense_block_step returns: outputs, losses and the gradient of every
    parameter (in DENSE_PARAMETER_NAMES order), each parameter's gradient being the sum
    of the gradients of the losses that update it."""

    s: Tensor
    t: Tensor
    loss_as: Tensor
    loss_ae: Tensor
    grads: list[Tensor]


def dense_block_step(
    s_prev: Tensor,
    t_prev: Tensor,
    params: Sequence[Tensor],
    x_activation: str = "elu",
    h_activation: str = "sigmoid",
    variant: Variant = "A",
    ae_loss: AELoss = "mse",
) -> DenseBlockStep:
    """One dense block: f = x_activation(Linear), b = sigmoid(Linear(sigmoid(Linear))),
    g = sigmoid(Linear), h = h_activation(Linear); params as nn.Linear stores them:
    W_f (H, d_x), c_f, W_b1 (B, H), c_b1, W_b2 (D, B), c_b2, W_g (D, d_y), c_g, W_h (d_y, D), c_h."""
    W_f, c_f, W_b1, c_b1, W_b2, c_b2, W_g, c_g, W_h, c_h = [p.detach().requires_grad_(True) for p in params]
    act_x = _ACTIVATIONS[check_choice(x_activation, "x_activation", X_ACTIVATIONS)]
    act_h = _ACTIVATIONS[check_choice(h_activation, "h_activation", H_ACTIVATIONS)]
    block = _FunctionalBlock(
        f=lambda x: act_x(F.linear(x, W_f, c_f)),
        g=lambda y: torch.sigmoid(F.linear(y, W_g, c_g)),
        b=lambda s: torch.sigmoid(F.linear(torch.sigmoid(F.linear(s, W_b1, c_b1)), W_b2, c_b2)),
        h=lambda t: act_h(F.linear(t, W_h, c_h)),
    )
    out = local_losses(block, s_prev, t_prev, variant, ae_loss)  # type: ignore[arg-type]
    leaves = (W_f, c_f, W_b1, c_b1, W_b2, c_b2, W_g, c_g, W_h, c_h)
    as_leaves = leaves[:6] + (leaves[6:8] if variant == "B" else ())
    grads_as = torch.autograd.grad(out.loss_as, as_leaves, retain_graph=True)
    grads_ae = torch.autograd.grad(out.loss_ae, leaves[6:])
    grads = list(grads_as[:6]) + [
        g_ae + (grads_as[6 + i] if variant == "B" else 0) for i, g_ae in enumerate(grads_ae[:2])
    ] + list(grads_ae[2:])
    return DenseBlockStep(out.s.detach(), out.t.detach(), out.loss_as.detach(), out.loss_ae.detach(), grads)


@dataclass
class _FunctionalBlock:
    f: Callable[[Tensor], Tensor]
    g: Callable[[Tensor], Tensor]
    b: Callable[[Tensor], Tensor]
    h: Callable[[Tensor], Tensor]
