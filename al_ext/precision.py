"""Precision policies that every engine shares: how a step's math runs, while the
parameters, the optimiser state and the update stay float32 (master weights).

- "fp32": everything in the parameters' dtype.
- "bf16": the forward and backward math under ``torch.autocast`` in bfloat16 (float32
  accumulation in the matrix products), the losses computed and reported in float32.
- "fp16": the same in float16, CUDA only, with dynamic loss scaling (a GradScaler), since
  float16 gradients underflow where bfloat16's do not.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from ._extension import _C
from .validation import check_choice

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


class Precision:
    """fp32: every step as written, in the parameters' dtype."""

    name = "fp32"
    # What the fused dense step takes as compute_dtype for this precision (None: the
    # parameters' dtype), with float32 master weights.
    compute_dtype: torch.dtype | None = None

    def autocast(self) -> ContextManager[Any]:
        """The context a step's forward pass (and loss) runs in."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        """After every optimiser of a batch has stepped."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BF16Precision(Precision):
    name = "bf16"
    compute_dtype = torch.bfloat16

    def __init__(self, device: torch.device) -> None:
        self.device_type = device.type

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


class FP16Precision(Precision):
    """float16 under autocast with dynamic loss scaling: a step whose scaled gradients
    overflow is skipped and the scale lowered (torch.amp.GradScaler)."""

    name = "fp16"
    compute_dtype = torch.float16

    def __init__(self, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.float16)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def update(self) -> None:
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)


def missing_bf16_hardware(device: torch.device) -> str | None:
    """What ``device`` lacks to multiply bfloat16 matrices in hardware, or None where it has
    it (or is of a kind not known here). Without it bf16 products are emulated, slower than
    float32's."""
    if device.type == "cpu" and not _C.build_info()["cpu_bf16_gemm"]:  # as torch's oneDNN finds the CPU
        return "this CPU has no bfloat16 matrix hardware (AVX512_BF16 or AMX)"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
        return "this GPU has no bfloat16 tensor cores (compute capability 8.0 or later)"
    return None


def make_precision(name: str, model: nn.Module, device: torch.device) -> Precision:
    """The policy ``name`` for ``model`` on ``device``; bf16 and fp16 keep float32 master
    weights, so the model's parameters must be float32."""
    check_choice(name, "precision", PRECISIONS)
    if name == "fp32":
        return Precision()
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"precision={name!r} keeps float32 master weights: the model's parameters must be "
                         f"float32, got {', '.join(sorted(map(str, dtypes)))}")
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError("precision='fp16' runs on CUDA only (float16 needs loss scaling and has no fast CPU "
                             "kernels); on the CPU use precision='bf16'")
        return FP16Precision(device)
    missing = missing_bf16_hardware(device)
    if missing is not None:
        # Emulated bf16 ran ALCNN's step 10x slower than float32 on an AVX2 CPU (benchmarks/RESULTS.md).
        faster = "precision='fp32' is faster here" if device.type == "cpu" else "precision='fp16' or 'fp32' is faster here"
        warnings.warn(f"precision='bf16': {missing}, so its bf16 matrix products are emulated and run slower than "
                      f"float32's; {faster}", UserWarning, stacklevel=3)
    return BF16Precision(device)
