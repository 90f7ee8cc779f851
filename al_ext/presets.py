"""Presets: the architectures of the authors' released code, by name, at any width.

Every model family takes ``preset=``; each argument left at None takes the preset's value,
and any argument given overrides it. ``preset=None`` is al_ext's own default, which for
ALMLP and ALCNN is the NECO architecture itself.

- ``"neco"``: Kao & Chen, Neural Computation 2021, TensorFlow code in the public repository
  SamYWK/Associated_Learning (ALMLP, ALCNN, VGG_AL, ResNet_AL);
- ``"iclr22"``: Wu et al., ICLR 2022, PyTorch code in the public repository Hibb-bb/AL,
  ``distributed_model.py`` (LSTM_AL, Transformer_AL). The same lab's later ALPackage
  (nick880107-git/Pipeline-Associated-Learning, ``ALPackage/lstm.py``, ``transformer.py``,
  ``emb.py``, ``base.py``) builds the same blocks, with three LSTM or attention blocks.

Each preset function below returns the keyword arguments of its family, and its docstring
names the reference it follows. ``training_settings`` gives each reference's optimiser
settings, for a Trainer. The references start training at once; the Trainer first trains
the label side alone (al_ext.label_warmup), which changes no part of the architecture and
is what takes NECO's sigmoid label side off chance in the first epochs at batch 32 to 256.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .label_side import LabelSide
from .validation import check_positive_float, check_positive_int

PresetOptions = dict[str, Any]

# NECO: sigmoid label side, every decoder sigmoid (h_1 too, under MSE), two-layer sigmoid
# bridges of 5 d hidden units. This is also al_ext's default label side.
NECO_LABEL_SIDE = LabelSide()
# ICLR 2022 (distributed_model.py, AE and ENC): g = Linear + tanh; h_1 = Linear + tanh before
# the cross-entropy; later h = Linear; bridge = Linear + tanh.
ICLR22_LABEL_SIDE = LabelSide(activation="tanh", bridge_activation="tanh", bridge_layers=1,
                              decoder_activation="identity", first_decoder_activation="tanh")


def neco_mlp() -> PresetOptions:
    """NECO's MNIST MLP_AL (SamYWK/Associated_Learning, MNIST/models.py, ``MLP_AL``): two
    blocks f = Dense(1024) + ELU; bridges Dense(5 x 1024) + sigmoid, Dense(1024) + sigmoid on
    each block's output; g = Dense(1024) + sigmoid, h = Dense + sigmoid, MSE throughout;
    He-normal weights, zero biases. Also al_ext's default for ALMLP."""
    return {"hidden": (1024, 1024), "label_dim": 1024, "bridge_factor": 5, "activation": "elu",
            "first_ae_loss": "mse", "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def neco_cnn() -> PresetOptions:
    """NECO's MNIST CNN_AL (SamYWK/Associated_Learning, MNIST/models.py, ``CNN_AL``): four
    blocks of two 3x3 convolutions with ELU and no batch norm, 32, 32 | 32, 32 (stride 2) |
    64, 64 | 64, 64 (stride 2); each bridge Dense(5 x 256) + sigmoid, Dense(256) + sigmoid on
    the flattened feature map; the NECO label side (width 256); He-normal. Also al_ext's
    default for ALCNN."""
    return {"channels": ((32, 32), (32, 32), (64, 64), (64, 64)), "strides": (1, 2, 1, 2), "label_dim": 256,
            "bridge_factor": 5, "activation": "elu", "bridge_input": "flatten", "first_ae_loss": "mse",
            "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def neco_vgg() -> PresetOptions:
    """NECO's CIFAR-10 VGG_AL (SamYWK/Associated_Learning, CIFAR10/models.py, ``VGG_AL``):
    four blocks, 3x3 convolutions with ELU and no batch norm, "M" a 2x2 max-pool:
    128, 256, M | 256, 512, M | 512, M, 512, M | Dense(1024) + ELU, Dense(1024) + ELU on the
    flattened map; each bridge Dense(1500) + sigmoid, Dense(300) + sigmoid on the flattened
    block output; the NECO label side of width 300; He-normal. (The reference also puts an
    L2 penalty of 1e-5 on the x-side and bridge kernels: the Trainer's weight_decay.)"""
    return {"stages": ((128, 256), (256, 512), (512, "M", 512)), "head": (1024, 1024), "batch_norm": False,
            "activation": "elu", "bridge_input": "flatten", "label_dim": 300, "bridge_factor": 5, "first_ae_loss": "mse",
            "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def neco_resnet() -> PresetOptions:
    """NECO's CIFAR-10 ResNet_AL (SamYWK/Associated_Learning, CIFAR10/models.py,
    ``ResNet_AL`` with ``ResNet_20_AL`` / ``ResNet_32_AL``): four blocks, the stem (3x3
    convolution to 16 channels, batch norm, ELU) as a block of its own, then one block per
    stage of n residual units (16, 32 stride 2, 64 stride 2). Each unit is conv-BN-ELU,
    conv-BN-ELU, added to the input (through a 1x1 convolution where the stride is 2), then
    ELU; every convolution has a bias. Each bridge Dense(1500) + sigmoid, Dense(300) + sigmoid
    on the flattened block output; the NECO label side of width 300; He-normal. (The
    reference's L2 penalty of 1e-4 is the Trainer's weight_decay.)"""
    return {"widths": (16, 32, 64), "stem_block": True, "residual_unit": "neco", "activation": "elu",
            "bridge_input": "flatten", "label_dim": 300, "bridge_factor": 5, "first_ae_loss": "mse",
            "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def iclr22_lstm() -> PresetOptions:
    """The ICLR 2022 LSTM (Hibb-bb/AL, distributed_model.py, ``LSTMModel`` with
    ``EMBLayer`` and ``LSTMLayer``; as ALPackage/lstm.py ``LSTMAL``): the embedding (300,
    PyTorch's own, padding an ordinary token) is block 1, its bridge Linear + tanh on the
    mean of the embeddings over every position; then one bidirectional LSTM per block
    (width 128), which starts from the final (h, c) of the block before and reads the padding
    too; each bridge Linear + tanh on the sum of the two directions' final h. Label side:
    g = Linear(128) + tanh, h_1 = Linear + tanh before the cross-entropy, later h = Linear;
    PyTorch's default initialisation."""
    return {"embed_dim": 300, "hidden": (128, 128), "label_dim": 128, "bridge_factor": 5, "first_ae_loss": "cross_entropy",
            "embedding_block": True, "bidirectional": True, "pass_state": True, "bridge_input": "final_state",
            "mask_padding": False, "label_side": ICLR22_LABEL_SIDE, "init": "torch"}


def iclr22_transformer() -> PresetOptions:
    """The ICLR 2022 Transformer (Hibb-bb/AL, distributed_model.py, ``TransModel`` with
    ``EMBLayer`` and ``TransLayer``, over transformer/encoder/; as
    ALPackage/transformer.py ``TransformerAL``): the embedding (300, no position encoding)
    is block 1, as in iclr22_lstm; then one attention block each (4 heads, feed-forward 256),
    pre-norm residuals with LayerNorm (x - mean) / (std + 1e-6), a closing LayerNorm,
    dropout 0.1, Xavier-uniform weight matrices; each bridge Linear + tanh on the mean of the
    real positions. The label side of iclr22_lstm (width 128)."""
    return {"dim": 300, "heads": 4, "feedforward": 256, "num_blocks": 2, "layers_per_block": 1, "positions": False,
            "encoder_layer": "iclr22", "dropout": 0.1, "embedding_block": True, "mask_padding": False, "label_dim": 128,
            "bridge_factor": 5, "first_ae_loss": "cross_entropy", "label_side": ICLR22_LABEL_SIDE, "init": "torch"}


# al_ext's own defaults where they differ from the references (the behaviour before presets).

def al_ext_vgg() -> PresetOptions:
    """al_ext's VGG_AL: VGG-11's stages for 32x32 images (3x3 convolutions, batch norm, ReLU,
    a 2x2 max-pool closing each stage), each bridge on the average-pooled stage output, the
    NECO label side of width 256, He-normal."""
    return {"stages": ((64,), (128,), (256, 256), (512, 512), (512, 512)), "head": (), "batch_norm": True,
            "activation": "relu", "bridge_input": "avgpool", "label_dim": 256, "bridge_factor": 5, "first_ae_loss": "mse",
            "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def al_ext_resnet() -> PresetOptions:
    """al_ext's ResNet_AL: the CIFAR ResNet of He et al. 2016 with one block per stage (the
    stem opens the first), units conv-BN-ReLU, conv-BN plus the (projected, batch-normed)
    input, then ReLU; bridges on the average-pooled stage output; NECO label side of width
    256; He-normal."""
    return {"widths": (16, 32, 64), "stem_block": False, "residual_unit": "he2016", "activation": "relu",
            "bridge_input": "avgpool", "label_dim": 256, "bridge_factor": 5, "first_ae_loss": "mse",
            "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def al_ext_lstm() -> PresetOptions:
    """al_ext's LSTM_AL: the embedding (128) and a unidirectional LSTM in block 1, one LSTM
    (256) in each further block, each bridge on the mean of the real positions; padding never
    changes a result; NECO label side of width 128, He-normal on the label side and bridges
    (the embedding and LSTMs keep PyTorch's initialisation)."""
    return {"embed_dim": 128, "hidden": (256, 256), "label_dim": 128, "bridge_factor": 5, "first_ae_loss": "mse",
            "embedding_block": False, "bidirectional": False, "pass_state": False, "bridge_input": "mean",
            "mask_padding": True, "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


def al_ext_transformer() -> PresetOptions:
    """al_ext's Transformer_AL: word and learned position embeddings (128) in block 1 with its
    attention layer, torch's post-norm nn.TransformerEncoderLayer (4 heads, feed-forward 256,
    no dropout) in each block, bridges on the mean of the real positions, NECO label side of
    width 128, He-normal on the label side and bridges."""
    return {"dim": 128, "heads": 4, "feedforward": 256, "num_blocks": 2, "layers_per_block": 1, "positions": True,
            "encoder_layer": "torch", "dropout": 0.0, "embedding_block": False, "mask_padding": True, "label_dim": 128,
            "bridge_factor": 5, "first_ae_loss": "mse", "label_side": NECO_LABEL_SIDE, "init": "he_normal"}


PRESETS: dict[str, dict[str | None, Callable[[], PresetOptions]]] = {
    "ALMLP": {None: neco_mlp, "neco": neco_mlp},
    "ALCNN": {None: neco_cnn, "neco": neco_cnn},
    "VGG_AL": {None: al_ext_vgg, "neco": neco_vgg},
    "ResNet_AL": {None: al_ext_resnet, "neco": neco_resnet},
    "LSTM_AL": {None: al_ext_lstm, "iclr22": iclr22_lstm},
    "Transformer_AL": {None: al_ext_transformer, "iclr22": iclr22_transformer},
}
PRESET_NAMES: tuple[str, ...] = ("neco", "iclr22")


def resolve(family: str, preset: str | None, **given: Any) -> PresetOptions:
    """The family's arguments: the preset's (al_ext's default for None), overridden by every
    argument given that is not None."""
    presets = PRESETS[family]
    if preset not in presets:
        names = ", ".join(repr(p) for p in presets if p is not None)
        raise ValueError(f"{family} has the preset{'s' if names.count(',') else ''} {names} (or None for "
                         f"al_ext's default), got {preset!r}")
    options = presets[preset]()
    unknown = set(given) - set(options)
    if unknown:  # a family asking for an argument its presets do not define is a bug here
        raise TypeError(f"{family}: no preset defines {', '.join(sorted(unknown))}")
    for name, value in given.items():  # a switch given as a string ("no") would read as true
        if value is not None and isinstance(options[name], bool) and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    options.update({k: bool(v) if isinstance(v, np.bool_) else v for k, v in given.items() if v is not None})
    if not isinstance(options["label_side"], LabelSide):
        raise TypeError(f"label_side must be an al_ext.label_side.LabelSide, got {type(options['label_side']).__name__}")
    return options


@dataclass(frozen=True)
class TrainingSettings:
    """A reference's optimiser settings: Adam at ``lr`` for (f, b) and ``ae_lr`` for (g, h),
    at ``batch_size``; ``source`` names the file that sets them."""

    lr: float
    ae_lr: float
    batch_size: int
    source: str

    def at(self, batch_size: int, width_ratio: float = 1.0) -> dict[str, Any]:
        """Trainer arguments for another batch size and width. Both rates are scaled by the
        square root of the batch ratio, the scaling rule for Adam (Malladi et al., NeurIPS
        2022), so that the steps an epoch loses are partly made up by their size; and by
        ``width_ratio``, the reference's label width over the model's: Adam moves every weight
        by about lr a step, so a sigmoid unit's input moves by about lr x fan-in, which
        saturates the wide bridges at too large a rate and leaves the label side on its
        plateau at too small a one. A narrower model keeps the reference's step per unit at
        a proportionally larger rate."""
        scale = math.sqrt(batch_size / self.batch_size) * width_ratio
        return {"lr": self.lr * scale, "ae_lr": self.ae_lr * scale, "batch_size": batch_size}


TRAINING_SETTINGS: dict[str, TrainingSettings] = {
    # MNIST/main.py and CIFAR10/main.py: lr 1e-4, inv_learning_rate 2 x lr, batch 32; 200
    # epochs, the NECO step schedule.
    "neco": TrainingSettings(1e-4, 2e-4, 32, "SamYWK/Associated_Learning MNIST/main.py"),
    # dis_train.py and dis_train_tr.py: lr 1e-3 for both optimisers of a block, batch 64, 20 epochs.
    "iclr22": TrainingSettings(1e-3, 1e-3, 64, "Hibb-bb/AL dis_train.py"),
}


# (preset, family) where a reference sets a family's rates apart from its preset's.
FAMILY_TRAINING_SETTINGS: dict[tuple[str, str], TrainingSettings] = {
    # CIFAR10/main.py starts every model whose name begins "ResNet" at lr 1e-3, the AL ones
    # ("ResNet_20_AL", "ResNet_32_AL") included; inv_learning_rate stays 2 x lr.
    ("neco", "ResNet_AL"): TrainingSettings(1e-3, 2e-3, 32, "SamYWK/Associated_Learning CIFAR10/main.py"),
}


def training_settings(preset: str, batch_size: int | None = None, width_ratio: float = 1.0,
                      family: type | object | None = None) -> dict[str, Any]:
    """Trainer arguments (lr, ae_lr, batch_size) of a preset's reference, at its batch size,
    or scaled to ``batch_size`` and ``width_ratio`` (TrainingSettings.at). ``family``, the
    model, its class (e.g. ResNet_AL, or a subclass) or its name ("ResNet_AL"), takes the
    family's own rates where the reference sets them."""
    if preset not in TRAINING_SETTINGS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, TRAINING_SETTINGS))}, got {preset!r}")
    # numbers.*: a batch size or ratio read from numpy is as good as Python's
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = check_positive_int(int(batch_size), "batch_size")
    if isinstance(width_ratio, bool) or not isinstance(width_ratio, numbers.Real):
        raise TypeError(f"width_ratio must be a positive finite number, got {width_ratio!r}")
    width_ratio = check_positive_float(float(width_ratio), "width_ratio")
    settings = TRAINING_SETTINGS[preset]
    if family is not None:
        if isinstance(family, str) and family not in PRESETS:  # a typo would take the generic rates silently
            raise ValueError(f"family must be one of {', '.join(map(repr, PRESETS))} (or the model or its class), "
                             f"got {family!r}")
        names = [family] if isinstance(family, str) else [
            c.__name__ for c in (family if isinstance(family, type) else type(family)).__mro__]
        settings = next((FAMILY_TRAINING_SETTINGS[(preset, name)] for name in names
                         if (preset, name) in FAMILY_TRAINING_SETTINGS), settings)
    return settings.at(settings.batch_size if batch_size is None else batch_size, width_ratio)
