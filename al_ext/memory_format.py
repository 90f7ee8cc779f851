"""The memory layout the engines give a model's convolutions.

On the CPU, oneDNN runs 2-D convolutions and their gradients faster on channels_last
tensors than on NCHW ones, and it takes channels_last when the weight is: so an engine puts
every 4-D parameter of a model with a Conv2d there once, before its optimisers exist, and
activations follow. Measured (benchmarks/RESULTS.md, the general path): VGG_AL and
ResNet_AL(20) steps 1.05-1.25x faster, ALCNN alike. The values, the state_dict and what a
checkpoint holds are unchanged (a layout is not a value). On CUDA, cuDNN's choice depends on
the GPU and the dtype, so the layout is left as it is there.
"""
from __future__ import annotations

import torch
from torch import nn


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``, on ``device``, trains faster with channels_last convolutions."""
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_fastest_memory_format(model: nn.Module) -> None:
    """Put ``model``'s 4-D parameters in channels_last where that is faster (in place: the
    parameters stay the same objects, so optimisers built before or after see them)."""
    parameter = next(model.parameters(), None)
    if parameter is not None and prefers_channels_last(model, parameter.device):
        model.to(memory_format=torch.channels_last)
