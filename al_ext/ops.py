"""Typed Python wrappers of the compiled ops, with their fake kernels and autograd formulas.

Each op is a schema in csrc/ops/registration.cpp, served by a CPU and a CUDA kernel
through the dispatcher, so torch.compile, opcheck and device dispatch all see it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (loading the extension registers the ops)


def mse_loss_and_grad(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean squared error over all elements and its gradient with respect to ``input``.

    Returns ``(loss, grad_input)`` with ``loss = mean((input - target) ** 2)`` (a 0-dim
    tensor of input's dtype) and ``grad_input = 2 (input - target) / input.numel()``, both
    computed in one pass over memory. Differentiable in both arguments.
    """
    return torch.ops.al_ext.mse_loss_and_grad.default(input, target)


def mse_loss(input: Tensor, target: Tensor) -> Tensor:
    """``torch.nn.functional.mse_loss`` (mean reduction) computed by the fused op.

    The gradient is produced by the forward pass and only scaled in the backward pass.
    """
    return mse_loss_and_grad(input, target)[0]


@torch.library.register_fake("al_ext::mse_loss_and_grad")
def _mse_loss_and_grad_fake(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(input.shape == target.shape, lambda: "target must have the shape of input")
    torch._check(input.dtype == target.dtype, lambda: "target must have the dtype of input")
    torch._check(input.device == target.device, lambda: "target must be on the device of input")
    return input.new_empty(()), torch.empty_like(input, memory_format=torch.contiguous_format)


def _mse_setup_context(ctx, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]) -> None:
    input, _ = inputs
    _, grad_input = output
    ctx.save_for_backward(grad_input)
    ctx.numel = input.numel()


def _mse_backward(ctx, grad_loss: Tensor | None, grad_of_grad: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    (grad_input,) = ctx.saved_tensors
    d_input = None
    if grad_loss is not None:
        d_input = grad_input * grad_loss
    if grad_of_grad is not None:
        # grad_input = 2 (input - target) / N is itself linear in input.
        term = grad_of_grad * (2.0 / ctx.numel)
        d_input = term if d_input is None else d_input + term
    if d_input is None:
        return None, None
    return d_input, -d_input


torch.library.register_autograd(
    "al_ext::mse_loss_and_grad", _mse_backward, setup_context=_mse_setup_context
)
