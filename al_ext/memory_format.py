"""The memory layout the engines give a model's convolutions, and the optimiser state that
must follow it.

On the CPU, oneDNN runs 2-D convolutions and their gradients faster on channels_last
tensors than on NCHW ones, and it takes channels_last when the weight is: so an engine puts
the Conv2d weights of a model there, in place, once, and the activations follow (other
modules' 4-D tensors stay as they are: one may be read as flat memory). Measured (benchmarks/RESULTS.md, the general path against a hand-written
NCHW loop): VGG_AL 1.20-1.25x, ResNet_AL(20) 1.05-1.17x, ALCNN at parity. The values, the
state_dict and what a checkpoint holds are unchanged (a layout is not a value), and the
parameters stay the same objects; the layout stays with the model if it later moves to a GPU
(cuDNN runs channels_last too). A model placed on CUDA before its engine is made keeps its
layout: cuDNN's choice depends on the GPU and the dtype.
"""
from __future__ import annotations

import torch
from torch import nn

def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``, on ``device``, trains faster with channels_last convolutions."""
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_fastest_memory_format(model: nn.Module) -> None:
    """Put ``model``'s Conv2d weights (and their gradients) in channels_last where that is
    faster. The convolutions' weights only: another module's 4-D parameter or buffer may be
    read as flat memory (a ``view(-1)``), which channels_last strides would refuse."""
    parameter = next(model.parameters(), None)
    if parameter is None or not prefers_channels_last(model, parameter.device):
        return
    for tensor in (m.weight for m in model.modules() if isinstance(m, nn.Conv2d)):
        if tensor.dim() == 4:
            # .to, not .contiguous: a weight of one input channel or a 1x1 kernel is already
            # "contiguous" in both layouts, and only .to gives it channels_last strides, which
            # is what the convolution reads to choose its layout.
            tensor.data = tensor.data.to(memory_format=torch.channels_last)
            if tensor.grad is not None:
                tensor.grad = tensor.grad.to(memory_format=torch.channels_last)


def match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every state tensor of ``optimizer`` shaped like its parameter the parameter's layout.
    torch's fused CPU optimisers walk a parameter, its gradient and its state as flat memory,
    so state loaded in another layout (a checkpoint written before the conversion, on another
    device, or sharded) would pair the wrong elements."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
