"""The initialisations a model family can be built with, by name."""
from __future__ import annotations

from typing import Literal

from torch import nn

from .validation import check_choice

Init = Literal["he_normal", "torch"]
INITS: tuple[str, ...] = ("he_normal", "torch")


def he_normal_(module: nn.Module) -> None:
    """He-normal weights and zero biases for every Linear and conv layer (the NECO initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def initialise(module: nn.Module, init: str) -> None:
    """"he_normal": He-normal weights and zero biases for every Linear and conv layer of
    ``module``; "torch": leave every layer as PyTorch (or the layer itself) initialised it."""
    if check_choice(init, "init", INITS) == "he_normal":
        he_normal_(module)
