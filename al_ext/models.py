"""The model zoo: AL versions of the networks in the papers, each a list of ALBlocks, so
that the Trainer, the pipeline, every inference path and bp_baseline work with all of them.

Vision models (NECO 2021): ALCNN (the MNIST/CIFAR CNN), VGG_AL, ResNet_AL (depth 20 or 32).
Every width is configurable; the defaults are those of ../shared/design/associated-learning.md.
The label side is the NECO one throughout: g = Linear + sigmoid, h = Linear + sigmoid (h_1
emits logits with first_ae_loss="cross_entropy"), bridge = Linear(-> bridge_factor * d) +
sigmoid, Linear(-> d) + sigmoid, after the block's feature map is flattened (ALCNN) or
average-pooled (VGG_AL, ResNet_AL).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .nn import ALBlock, AssociatedLearning, Backend, he_normal_
from .reference import AELoss, Variant
from .validation import check_positive_int


class ToImage(nn.Module):
    """Reshapes a batch, flat or not, to (N, C, H, W), so image models take flattened data too."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def _label_side(y_dim: int, label_dim: int, logits: bool) -> tuple[nn.Module, nn.Module]:
    g = nn.Sequential(nn.Linear(y_dim, label_dim), nn.Sigmoid())
    h = nn.Sequential(nn.Linear(label_dim, y_dim)) if logits else nn.Sequential(nn.Linear(label_dim, y_dim), nn.Sigmoid())
    return g, h


def _bridge(features: int, label_dim: int, bridge_factor: int, pool: bool) -> nn.Module:
    reduce = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool else [nn.Flatten()]
    hidden = bridge_factor * label_dim
    return nn.Sequential(*reduce, nn.Linear(features, hidden), nn.Sigmoid(), nn.Linear(hidden, label_dim), nn.Sigmoid())


def _feature_shape(encoders: Sequence[nn.Module], in_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The output shape (without batch) of each encoder, by running a dummy sample through."""
    shapes = []
    with torch.no_grad():
        s = torch.zeros(1, *in_shape)
        for f in encoders:
            s = f(s)
            shapes.append(tuple(s.shape[1:]))
    return shapes


class _VisionAL(AssociatedLearning):
    """Blocks from a list of x-side encoders; bridges and label side by the NECO recipe."""

    def __init__(self, encoders: list[nn.Module], in_shape: Sequence[int], num_classes: int, label_dim: int,
                 bridge_factor: int, pool: bool, variant: Variant, backend: Backend, first_ae_loss: AELoss) -> None:
        check_positive_int(num_classes, "num_classes")
        check_positive_int(label_dim, "label_dim")
        check_positive_int(bridge_factor, "bridge_factor")
        in_shape = tuple(in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
        encoders[0] = nn.Sequential(ToImage(in_shape), encoders[0])
        shapes = _feature_shape(encoders, in_shape)
        blocks = []
        y_dim = num_classes
        for i, (f, shape) in enumerate(zip(encoders, shapes)):
            features = shape[0] if pool else math.prod(shape)
            g, h = _label_side(y_dim, label_dim, logits=i == 0 and first_ae_loss == "cross_entropy")
            blocks.append(ALBlock(f, g, _bridge(features, label_dim, bridge_factor, pool), h))
            y_dim = label_dim
        super().__init__(blocks, num_classes, variant=variant, first_ae_loss=first_ae_loss, backend=backend)
        self.in_features = math.prod(in_shape)
        he_normal_(self)


class ALCNN(_VisionAL):
    """The NECO MNIST/CIFAR CNN: L = 4 blocks of two 3x3 convolutions with ELU and no batch
    norm, (32, 32), (32, 32 stride 2), (64, 64), (64, 64 stride 2); d = 256; each bridge
    takes the block's flattened feature map (1280 hidden units with bridge_factor 5)."""

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 channels: Sequence[tuple[int, int]] = ((32, 32), (32, 32), (64, 64), (64, 64)),
                 strides: Sequence[int] = (1, 2, 1, 2), label_dim: int = 256, bridge_factor: int = 5,
                 variant: Variant = "A", backend: Backend = "auto", first_ae_loss: AELoss = "mse") -> None:
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels and strides must give one entry per block, got {len(channels)} and {len(strides)}")
        encoders: list[nn.Module] = []
        c_in = in_shape[0]
        for (c1, c2), stride in zip(channels, strides):
            encoders.append(nn.Sequential(_conv(c_in, c1), nn.ELU(), _conv(c1, c2, stride), nn.ELU()))
            c_in = c2
        super().__init__(encoders, in_shape, num_classes, label_dim, bridge_factor, False, variant, backend,
                         first_ae_loss)


class VGG_AL(_VisionAL):
    """VGG as AL blocks: each block a VGG stage (3x3 convolutions with batch norm and ReLU, then
    2x2 max-pooling); each bridge average-pools the stage's output. The default is VGG-11's
    stages for 32x32 images."""

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 stages: Sequence[Sequence[int]] = ((64,), (128,), (256, 256), (512, 512), (512, 512)),
                 label_dim: int = 256, bridge_factor: int = 5, variant: Variant = "A", backend: Backend = "auto",
                 first_ae_loss: AELoss = "mse") -> None:
        if not stages or not all(stages):
            raise ValueError("stages must list at least one stage, each with at least one convolution width")
        if min(in_shape[1:]) < 2 ** len(stages):
            raise ValueError(f"in_shape {tuple(in_shape)} is too small for {len(stages)} stages that each halve the "
                             f"image: height and width must be at least {2 ** len(stages)}")
        encoders: list[nn.Module] = []
        c_in = in_shape[0]
        for widths in stages:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [_conv(c_in, w), nn.BatchNorm2d(w), nn.ReLU()]
                c_in = w
            encoders.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        super().__init__(encoders, in_shape, num_classes, label_dim, bridge_factor, True, variant, backend,
                         first_ae_loss)


class BasicBlock(nn.Module):
    """The CIFAR ResNet's residual unit: two 3x3 convolutions with batch norm, and a 1x1
    projection on the shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(),
                                  _conv(out_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet_AL(_VisionAL):
    """The CIFAR ResNet (He et al. 2016; depth 6n + 2: 20 or 32) as AL blocks: the three stages
    of n residual units (widths 16, 32, 64; the stem convolution opens the first); each bridge
    average-pools its stage's output."""

    def __init__(self, depth: int = 20, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), label_dim: int = 256, bridge_factor: int = 5,
                 variant: Variant = "A", backend: Backend = "auto", first_ae_loss: AELoss = "mse") -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, ...), got {depth!r}")
        units = (depth - 2) // 6
        encoders: list[nn.Module] = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            layers: list[nn.Module] = []
            if stage == 0:
                layers += [_conv(in_shape[0], widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU()]
            for unit in range(units):
                layers.append(BasicBlock(c_in, width, 2 if unit == 0 and stage > 0 else 1))
                c_in = width
            encoders.append(nn.Sequential(*layers))
        super().__init__(encoders, in_shape, num_classes, label_dim, bridge_factor, True, variant, backend,
                         first_ae_loss)
        self.depth_of_resnet = depth


# ---- text models (ICLR 2022) --------------------------------------------------------------
# A sequence state between blocks is (N, T, H + 1): the features of each position, and last
# the padding mask (1 for a token, 0 for padding), so that every block and every bridge
# knows which positions are real.

PAD = 0


class TokenEmbedding(nn.Module):
    """Token ids (N, T) -> sequence state; PAD (0) positions are masked. With ``max_len``,
    learned position embeddings are added (for attention, which has no order of its own)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int | None = None) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, dim) if max_len else None

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != PAD).unsqueeze(-1).to(self.tokens.weight.dtype)
        h = self.tokens(ids)
        if self.positions is not None:
            if ids.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"sequences of {ids.shape[1]} tokens exceed max_len {self.positions.num_embeddings}")
            h = h + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return torch.cat([h * mask, mask], dim=-1)


def _split(state: Tensor) -> tuple[Tensor, Tensor]:
    return state[..., :-1], state[..., -1:]


class MaskedLSTM(nn.Module):
    """An LSTM over the sequence state; padding (at the end) never reaches a real position."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)

    def forward(self, state: Tensor) -> Tensor:
        h, mask = _split(state)
        out, _ = self.lstm(h)
        return torch.cat([out * mask, mask], dim=-1)


class MaskedTransformerLayer(nn.Module):
    """A Transformer encoder layer whose attention skips padded positions."""

    def __init__(self, dim: int, heads: int, feedforward: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, feedforward, dropout=0.0, batch_first=True)

    def forward(self, state: Tensor) -> Tensor:
        h, mask = _split(state)
        padding = mask[..., 0] == 0
        padding[:, 0] = False  # an all-padding row would make attention 0/0
        out = self.layer(h, src_key_padding_mask=padding)
        return torch.cat([out * mask, mask], dim=-1)


class MaskedMeanPool(nn.Module):
    """The mean of the real (unmasked) positions: (N, T, H + 1) -> (N, H)."""

    def forward(self, state: Tensor) -> Tensor:
        h, mask = _split(state)
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class _SequenceAL(AssociatedLearning):
    """Blocks over token sequences: x-side encoders on the sequence state, bridges after
    masked mean pooling, the NECO label side."""

    def __init__(self, encoders: list[nn.Module], widths: Sequence[int], vocab_size: int, num_classes: int,
                 label_dim: int, bridge_factor: int, variant: Variant, backend: Backend,
                 first_ae_loss: AELoss) -> None:
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(label_dim, "label_dim")
        check_positive_int(bridge_factor, "bridge_factor")
        blocks = []
        y_dim = num_classes
        for i, (f, width) in enumerate(zip(encoders, widths)):
            g, h = _label_side(y_dim, label_dim, logits=i == 0 and first_ae_loss == "cross_entropy")
            hidden = bridge_factor * label_dim
            b = nn.Sequential(MaskedMeanPool(), nn.Linear(width, hidden), nn.Sigmoid(), nn.Linear(hidden, label_dim),
                              nn.Sigmoid())
            for part in (g, h, b):
                he_normal_(part)  # the encoders keep PyTorch's own initialisation
            blocks.append(ALBlock(f, g, b, h))
            y_dim = label_dim
        super().__init__(blocks, num_classes, variant=variant, first_ae_loss=first_ae_loss, backend=backend)
        self.vocab_size = vocab_size


class LSTM_AL(_SequenceAL):
    """The ICLR 2022 LSTM text classifier as AL blocks: the word embedding and an LSTM in the
    first block, one LSTM layer in each further block; inputs are token ids (0 = padding)."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 128, hidden: Sequence[int] = (256, 256),
                 label_dim: int = 128, bridge_factor: int = 5, variant: Variant = "A", backend: Backend = "auto",
                 first_ae_loss: AELoss = "mse") -> None:
        hidden = list(hidden)
        if not hidden:
            raise ValueError("hidden must list at least one LSTM width (one per block), got none")
        encoders: list[nn.Module] = []
        in_dim = embed_dim
        for i, width in enumerate(hidden):
            lstm = MaskedLSTM(in_dim, check_positive_int(width, f"hidden[{i}]"))
            encoders.append(nn.Sequential(TokenEmbedding(vocab_size, embed_dim), lstm) if i == 0 else lstm)
            in_dim = width
        super().__init__(encoders, hidden, vocab_size, num_classes, label_dim, bridge_factor, variant, backend,
                         first_ae_loss)


class Transformer_AL(_SequenceAL):
    """The ICLR 2022 Transformer text classifier as AL blocks: the word and position embeddings
    and ``layers_per_block`` encoder layers in the first block, as many in each further one."""

    def __init__(self, vocab_size: int, num_classes: int, max_len: int = 256, dim: int = 128, heads: int = 4,
                 feedforward: int = 256, num_blocks: int = 2, layers_per_block: int = 1, label_dim: int = 128,
                 bridge_factor: int = 5, variant: Variant = "A", backend: Backend = "auto",
                 first_ae_loss: AELoss = "mse") -> None:
        check_positive_int(num_blocks, "num_blocks")
        check_positive_int(layers_per_block, "layers_per_block")
        if dim % check_positive_int(heads, "heads"):
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        encoders: list[nn.Module] = []
        for i in range(num_blocks):
            layers: list[nn.Module] = [TokenEmbedding(vocab_size, dim, max_len)] if i == 0 else []
            layers += [MaskedTransformerLayer(dim, heads, feedforward) for _ in range(layers_per_block)]
            encoders.append(nn.Sequential(*layers))
        super().__init__(encoders, [dim] * num_blocks, vocab_size, num_classes, label_dim, bridge_factor, variant,
                         backend, first_ae_loss)
