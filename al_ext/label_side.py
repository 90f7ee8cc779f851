"""The label side and the bridges of an AL model, built from one description.

Every model family builds its g_i, h_i and b_i here, so that the label-side activation, the
bridge's form and the decoders' activations are one argument (``LabelSide``) for all of them.
The two references differ exactly in these parts:

- NECO 2021 (TensorFlow): g = Linear + sigmoid, every h = Linear + sigmoid, and the bridge
  Linear(-> 5d) + sigmoid, Linear(-> d) + sigmoid;
- ICLR 2022 (PyTorch): g = Linear + tanh, h_1 = Linear + tanh (before the cross-entropy),
  later h = Linear alone, and the bridge Linear(-> d) + tanh.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .reference import ACTIVATION_MODULES, AELoss
from .validation import check_choice

# The label side's activations by name; "identity" means the Linear layer alone (no module
# after it), the form the fused dense block step recognises.
ACTIVATIONS: tuple[str, ...] = (*ACTIVATION_MODULES, "identity")
BRIDGE_LAYERS: tuple[int, ...] = (1, 2)


def linear_then(in_features: int, out_features: int, activation: str) -> nn.Sequential:
    """Linear, then the named activation (none for "identity")."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    if activation != "identity":
        layers.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class LabelSide:
    """How each block's label encoder g, decoder h and bridge b are built.

    ``activation``: g_i = Linear + activation; it sets the range of t_i, which the bridge
    must reach, so the bridge's last activation is usually the same.
    ``bridge_layers``: 2 gives Linear(-> bridge_factor * d) + bridge_activation, Linear(-> d)
    + bridge_activation (NECO); 1 gives Linear(-> d) + bridge_activation (ICLR 2022).
    ``decoder_activation``: h_i = Linear + decoder_activation for i >= 2.
    ``first_decoder_activation``: h_1's; None keeps al_ext's rule: ``decoder_activation``
    under an MSE first loss, and no activation (logits) under cross-entropy.
    The defaults are NECO's (sigmoid throughout), al_ext's default for every family.
    """

    activation: str = "sigmoid"
    bridge_activation: str = "sigmoid"
    bridge_layers: int = 2
    decoder_activation: str = "sigmoid"
    first_decoder_activation: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.activation, "label_side.activation", ACTIVATIONS)
        check_choice(self.bridge_activation, "label_side.bridge_activation", ACTIVATIONS)
        if isinstance(self.bridge_layers, bool) or self.bridge_layers not in BRIDGE_LAYERS:
            raise ValueError(f"label_side.bridge_layers must be 1 or 2, got {self.bridge_layers!r}")
        check_choice(self.decoder_activation, "label_side.decoder_activation", ACTIVATIONS)
        if self.first_decoder_activation is not None:
            check_choice(self.first_decoder_activation, "label_side.first_decoder_activation", ACTIVATIONS)

    def encoder(self, y_dim: int, label_dim: int) -> nn.Sequential:
        """g: t_{i-1} (y_dim) -> t_i (label_dim)."""
        return linear_then(y_dim, label_dim, self.activation)

    def decoder(self, label_dim: int, y_dim: int, first: bool, first_ae_loss: AELoss) -> nn.Sequential:
        """h: t_i -> t_{i-1}; ``first`` for h_1, which decodes the labels themselves."""
        if not first:
            return linear_then(label_dim, y_dim, self.decoder_activation)
        if self.first_decoder_activation is not None:
            return linear_then(label_dim, y_dim, self.first_decoder_activation)
        return linear_then(label_dim, y_dim, "identity" if first_ae_loss == "cross_entropy" else self.decoder_activation)

    def bridge(self, features: int, label_dim: int, bridge_factor: int, reduce: Sequence[nn.Module] = ()) -> nn.Sequential:
        """b: the block's x-side output, made a vector by ``reduce`` (flatten, pooling...),
        of ``features`` values -> t_i's space."""
        if self.bridge_layers == 1:
            layers = [*linear_then(features, label_dim, self.bridge_activation)]
        else:
            hidden = bridge_factor * label_dim
            layers = [*linear_then(features, hidden, self.bridge_activation),
                      *linear_then(hidden, label_dim, self.bridge_activation)]
        return nn.Sequential(*reduce, *layers)


# NECO's form (two-layer bridges, every decoder activated) with tanh in place of sigmoid. A
# sigmoid's outputs share an offset of about 1/2, which the next block's weights turn into a
# common input that swamps the classes' differences, so every block keeps less of their
# separation and its auto-encoder starts on a longer plateau; tanh is centred on 0. A remedy
# the collapse warning names when deeper blocks lag, besides the label warm-up, which keeps
# the sigmoid (al_ext.label_warmup; experiments/preset_batch_grid.py).
ZERO_CENTRED = LabelSide(activation="tanh", bridge_activation="tanh", decoder_activation="tanh")
