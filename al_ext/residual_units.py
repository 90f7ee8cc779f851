"""The residual units of ResNet_AL: He et al.'s CIFAR unit and the NECO code's variant."""
from __future__ import annotations

from torch import Tensor, nn

from .reference import ACTIVATION_MODULES


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class BasicBlock(nn.Module):
    """The CIFAR ResNet's residual unit (He et al. 2016): conv-BN-activation, conv-BN, plus
    the input (through a 1x1 convolution and batch norm where the shape changes), then the
    activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str = "relu") -> None:
        super().__init__()
        act = ACTIVATION_MODULES[activation]
        self.body = nn.Sequential(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), act(),
                                  conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride), nn.BatchNorm2d(out_channels))
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class NecoResidualUnit(nn.Module):
    """The NECO code's unit (CIFAR10/models.py, ``resBlock``): conv-BN-activation twice (the
    second also activated before the sum), plus the input (through a 1x1 convolution without
    batch norm where the shape changes), then the activation again."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str = "elu") -> None:
        super().__init__()
        act = ACTIVATION_MODULES[activation]
        self.body = nn.Sequential(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), act(),
                                  conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels), act())
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Conv2d(
            in_channels, out_channels, 1, stride=stride)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


RESIDUAL_UNITS: dict[str, type[nn.Module]] = {"he2016": BasicBlock, "neco": NecoResidualUnit}
