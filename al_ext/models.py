"""The model zoo: AL versions of the networks in the papers, each a list of ALBlocks, so
that the Trainer, the pipeline, every inference path and bp_baseline work with all of them.

Vision models (NECO 2021): ALCNN (the MNIST/CIFAR CNN), VGG_AL, ResNet_AL (depth 6n + 2).
Text models (ICLR 2022): LSTM_AL, Transformer_AL (al_ext.sequence_models).
Every family takes its widths, the label side and bridges (``label_side``, an
al_ext.label_side.LabelSide), the initialisation (``init``) and a ``preset`` naming the
authors' code it reproduces (al_ext.presets); arguments left at None take the preset's value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import presets
from .initialisation import Init, initialise
from .label_side import LabelSide
from .nn import ALBlock, AssociatedLearning, Backend, evaluating
from .reference import AE_LOSSES, AELoss, Variant, activation_module
from .residual_units import RESIDUAL_UNITS, BasicBlock, NecoResidualUnit, conv3x3  # noqa: F401
from .validation import check_choice, check_positive_int, check_sequence, check_widths

BRIDGE_INPUTS: tuple[str, ...] = ("flatten", "avgpool")
MAX_POOL = "M"  # in a VGG stage, a 2x2 max-pool


class ToImage(nn.Module):
    """Reshapes a batch, flat or not, to (N, C, H, W), so image models take flattened data too."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class _FlattenFunction(torch.autograd.Function):
    """x.flatten(1) of a channels_last map, whose gradient comes back channels_last. Through
    plain flatten it comes back NCHW, and the activation's backward before it then reads two
    layouts at once, 2-3x slower than the copy this makes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.flatten(1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


class FlattenMap(nn.Flatten):
    """nn.Flatten() of a block's output for its bridge, to (N, features), keeping a
    channels_last map's layout on the way back (al_ext.memory_format)."""

    def __init__(self) -> None:
        super().__init__()  # from dim 1 to the last: the dims the function below flattens

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return _FlattenFunction.apply(x)
        return x.flatten(1)


def _feature_shape(encoders: Sequence[nn.Module], in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The output shape (without batch) of each encoder, by running a dummy sample through in
    eval mode: no BatchNorm statistic of the new model moves, and a 1 x 1 map is legal."""
    shapes = []
    with evaluating(nn.ModuleList(encoders)):
        s = torch.zeros(1, *in_shape)
        for f in encoders:
            s = f(s)
            shapes.append(tuple(s.shape[1:]))
    return shapes


def _bridge_reduce(shape: tuple[int, ...], bridge_input: str) -> tuple[list[nn.Module], int]:
    """How a bridge makes a block's output a vector, and how many values that gives: a
    feature map flattened or average-pooled, a vector as it is."""
    if len(shape) == 1:
        return [], shape[0]
    if bridge_input == "avgpool":
        return [nn.AdaptiveAvgPool2d(1), FlattenMap()], shape[0]
    return [FlattenMap()], math.prod(shape)


class _VisionAL(AssociatedLearning):
    """Blocks from a list of x-side encoders; bridges and label side as ``o`` (the resolved
    preset options) describes them."""

    def __init__(self, encoders: list[nn.Module], in_shape: Sequence[int], num_classes: int, o: dict[str, Any],
                 variant: Variant, backend: Backend) -> None:
        check_positive_int(num_classes, "num_classes")
        label_dim = check_positive_int(o["label_dim"], "label_dim")
        bridge_factor = check_positive_int(o["bridge_factor"], "bridge_factor")
        bridge_input = check_choice(o["bridge_input"], "bridge_input", BRIDGE_INPUTS)
        first_loss = check_choice(o["first_ae_loss"], "first_ae_loss", AE_LOSSES)
        side: LabelSide = o["label_side"]
        in_shape = _check_image_shape(in_shape)
        encoders[0] = nn.Sequential(ToImage(in_shape), encoders[0])
        blocks = []
        y_dim = num_classes
        for i, (f, shape) in enumerate(zip(encoders, _feature_shape(encoders, in_shape))):
            reduce, features = _bridge_reduce(shape, bridge_input)
            blocks.append(ALBlock(f, side.encoder(y_dim, label_dim), side.bridge(features, label_dim, bridge_factor, reduce),
                                  side.decoder(label_dim, y_dim, first=i == 0, first_ae_loss=first_loss)))
            y_dim = label_dim
        super().__init__(blocks, num_classes, variant=variant, first_ae_loss=first_loss, backend=backend)
        self.in_features, self.in_shape = math.prod(in_shape), in_shape
        initialise(self, o["init"])


def _check_image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    in_shape = tuple(check_sequence(in_shape, "in_shape", "three positive integers (channels, height, width)"))
    if len(in_shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width), three positive integers, got {in_shape}")
    return in_shape  # type: ignore[return-value]


class ALCNN(_VisionAL):
    """The NECO MNIST/CIFAR CNN (al_ext.presets.neco_cnn, also the default): L = 4 blocks of two
    3x3 convolutions with ELU (or ``activation``) and no batch norm, (32, 32), (32, 32 stride 2),
    (64, 64), (64, 64 stride 2); d = 256; each bridge takes the block's flattened feature map
    (1280 hidden units with bridge_factor 5), or its average over positions with
    ``bridge_input="avgpool"``."""

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 channels: Sequence[tuple[int, int]] | None = None, strides: Sequence[int] | None = None,
                 label_dim: int | None = None, bridge_factor: int | None = None, variant: Variant = "A",
                 backend: Backend = "auto", first_ae_loss: AELoss | None = None, activation: str | None = None,
                 bridge_input: str | None = None, label_side: LabelSide | None = None, init: Init | None = None,
                 preset: str | None = None) -> None:
        strides_given = strides is not None
        o = presets.resolve("ALCNN", preset, channels=channels, strides=strides, label_dim=label_dim,
                            bridge_factor=bridge_factor, first_ae_loss=first_ae_loss, activation=activation,
                            bridge_input=bridge_input, label_side=label_side, init=init)
        channels = check_sequence(o["channels"], "channels", "(c1, c2) pairs, one per block")
        strides = check_sequence(o["strides"], "strides", "integers, one per block")
        if len(channels) != len(strides) or not channels:
            hint = "" if strides_given else " (the preset's strides: pass strides= too, one per block)"
            raise ValueError(f"channels and strides must give one entry per block, got {len(channels)} and "
                             f"{len(strides)}{hint}")
        for i, pair in enumerate(channels):
            if len(check_sequence(pair, f"channels[{i}]", "two channel counts (first conv's, second conv's)")) != 2:
                raise ValueError(f"channels[{i}] must be a pair (first conv's channels, second conv's), got {pair!r}")
        in_shape = _check_image_shape(in_shape)
        act = activation_module(o["activation"])
        encoders: list[nn.Module] = []
        c_in = in_shape[0]
        for i, ((c1, c2), stride) in enumerate(zip(channels, strides)):
            for name, value in ((f"channels[{i}][0]", c1), (f"channels[{i}][1]", c2), (f"strides[{i}]", stride)):
                check_positive_int(value, name)
            encoders.append(nn.Sequential(conv3x3(c_in, c1), act(), conv3x3(c1, c2, stride), act()))
            c_in = c2
        super().__init__(encoders, in_shape, num_classes, o, variant, backend)


class VGG_AL(_VisionAL):
    """VGG as AL blocks. Each block is a stage: 3x3 convolutions (with batch norm if
    ``batch_norm``) and ``activation``, "M" for a 2x2 max-pool inside the stage, and a 2x2
    max-pool closing it; ``head`` adds a last block of dense layers on the flattened map.
    Each bridge flattens or average-pools its block's output (``bridge_input``).
    The default is VGG-11's stages for 32x32 images (al_ext.presets.al_ext_vgg);
    ``preset="neco"`` is the NECO code's VGG_AL (al_ext.presets.neco_vgg)."""

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 stages: Sequence[Sequence[int | str]] | None = None, label_dim: int | None = None,
                 bridge_factor: int | None = None, variant: Variant = "A", backend: Backend = "auto",
                 first_ae_loss: AELoss | None = None, head: Sequence[int] | None = None, batch_norm: bool | None = None,
                 activation: str | None = None, bridge_input: str | None = None, label_side: LabelSide | None = None,
                 init: Init | None = None, preset: str | None = None) -> None:
        o = presets.resolve("VGG_AL", preset, stages=stages, head=head, batch_norm=batch_norm, activation=activation,
                            bridge_input=bridge_input, label_dim=label_dim, bridge_factor=bridge_factor,
                            first_ae_loss=first_ae_loss, label_side=label_side, init=init)
        stages = [check_sequence(stage, f"stages[{i}]", f"convolution widths and {MAX_POOL!r}s (max-pools)")
                  for i, stage in enumerate(check_sequence(o["stages"], "stages", "stages"))]
        head = check_widths(o["head"], "head", "dense layer widths", allow_empty=True)
        if not stages or not all(any(w != MAX_POOL for w in stage) for stage in stages):
            raise ValueError("stages must list at least one stage, each with at least one convolution width")
        for i, stage in enumerate(stages):
            for j, w in enumerate(stage):
                if w != MAX_POOL:
                    check_positive_int(w, f"stages[{i}][{j}] (a convolution width, or {MAX_POOL!r} for a max-pool)")
        in_shape = _check_image_shape(in_shape)
        pools = sum(1 + sum(w == MAX_POOL for w in stage) for stage in stages)
        if min(in_shape[1:]) < 2 ** pools:
            raise ValueError(f"in_shape {tuple(in_shape)} is too small for {len(stages)} stages with {pools} 2x2 "
                             f"max-pools: height and width must be at least {2 ** pools}")
        act = activation_module(o["activation"])
        encoders: list[nn.Module] = []
        c_in = in_shape[0]
        for stage in stages:
            layers: list[nn.Module] = []
            for w in stage:
                if w == MAX_POOL:
                    layers.append(nn.MaxPool2d(2))
                    continue
                layers += [conv3x3(c_in, w), *([nn.BatchNorm2d(w)] if o["batch_norm"] else []), act()]
                c_in = w
            encoders.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        if head:
            width = math.prod(_feature_shape(encoders, in_shape)[-1])  # the last stage's map, flattened
            layers = [nn.Flatten()]
            for i, w in enumerate(head):
                layers += [nn.Linear(width, w), act()]
                width = w
            encoders.append(nn.Sequential(*layers))
        super().__init__(encoders, in_shape, num_classes, o, variant, backend)


class ResNet_AL(_VisionAL):
    """The CIFAR ResNet (He et al. 2016; depth 6n + 2: 20 or 32) as AL blocks: three stages of
    n residual units (``widths``, stride 2 opening the second and third) after a stem
    convolution. By default (al_ext.presets.al_ext_resnet) the stem opens the first of three
    blocks, the units are He et al.'s, and each bridge average-pools its stage's output;
    ``preset="neco"`` is the NECO code's ResNet_AL (al_ext.presets.neco_resnet): the stem a
    block of its own, NECO's units, ELU, flattened bridges."""

    def __init__(self, depth: int = 20, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 widths: Sequence[int] | None = None, label_dim: int | None = None, bridge_factor: int | None = None,
                 variant: Variant = "A", backend: Backend = "auto", first_ae_loss: AELoss | None = None,
                 stem_block: bool | None = None, residual_unit: str | None = None, activation: str | None = None,
                 bridge_input: str | None = None, label_side: LabelSide | None = None, init: Init | None = None,
                 preset: str | None = None) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, ...), got {depth!r}")
        o = presets.resolve("ResNet_AL", preset, widths=widths, stem_block=stem_block, residual_unit=residual_unit,
                            activation=activation, bridge_input=bridge_input, label_dim=label_dim,
                            bridge_factor=bridge_factor, first_ae_loss=first_ae_loss, label_side=label_side, init=init)
        unit = RESIDUAL_UNITS[check_choice(o["residual_unit"], "residual_unit", tuple(RESIDUAL_UNITS))]
        activation = o["activation"]
        act = activation_module(activation)
        widths = check_widths(o["widths"], "widths", "stage widths")
        in_shape = _check_image_shape(in_shape)
        units = (depth - 2) // 6
        stem: list[nn.Module] = [conv3x3(in_shape[0], widths[0]), nn.BatchNorm2d(widths[0]), act()]
        encoders: list[nn.Module] = [nn.Sequential(*stem)] if o["stem_block"] else []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            layers: list[nn.Module] = stem if stage == 0 and not o["stem_block"] else []
            for i in range(units):
                layers.append(unit(c_in, width, 2 if i == 0 and stage > 0 else 1, activation))
                c_in = width
            encoders.append(nn.Sequential(*layers))
        super().__init__(encoders, in_shape, num_classes, o, variant, backend)
        self.depth_of_resnet = depth


# The text models live in al_ext.sequence_models; here too, so that the zoo is one import.
from .sequence_models import LSTM_AL, Transformer_AL  # noqa: F401
