"""Argument checks with messages that name the argument and say what was expected.

Bad input must fail here, loudly, rather than crash inside a kernel or train on garbage.
"""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(value: Any, name: str) -> Tensor:
    tensor = check_tensor(value, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise if any element is NaN or infinite. Synchronises with the device."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); expected only finite values")


def first_parameter(model: torch.nn.Module) -> Tensor:
    """A parameter of ``model``, whose device and dtype are the model's."""
    for p in model.parameters():
        return p
    raise ValueError("the model has no parameters: it needs some to learn (and to say where it runs)")


def check_output_path(path: Any, name: str) -> Path:
    """A file to be written later: its folder must exist now, so that a run does not fail
    only after it has trained."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{name}: the folder {str(path.parent)!r} (of {str(path)!r}) does not exist")
    if path.is_dir():
        raise ValueError(f"{name} must name a file, got the folder {str(path)!r}")
    return path


def check_device(tensor: Tensor, name: str, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} (the model's device), got {tensor.device}")


def check_labels(labels: Any, num_classes: int | None, name: str = "y", length: int | None = None,
                 read_values: bool = True) -> Tensor:
    """Integer class labels, one per sample, each in [0, num_classes) (from 0 where
    ``num_classes`` is None: unknown). ``read_values=False`` leaves out the range, whose
    check reads the values (a wait, for labels on a GPU)."""
    y = check_tensor(labels, name)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {tuple(y.shape)}")
    if length is not None and y.shape[0] != length:
        raise ValueError(f"{name} must have one label per sample ({length}), got {y.shape[0]}")
    if read_values and y.numel() > 0:
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes if num_classes is not None else 'classes'}), got "
                             f"values from {low} to {high}")
    return y.long()


def classes_of(model: Any, required: bool = True) -> int | None:
    """A classifier's ``num_classes``, which the labels are checked against; None where a
    classifier that is not ``required`` to say has no such attribute."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and not required:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model must have a num_classes attribute of at least 2 (the number of classes), "
                         f"got {num_classes!r}")
    return num_classes


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_sequence(value: Any, name: str, what: str) -> list[Any]:
    """A list or tuple (any sequence but a string) of ``what``, as a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of {what}, got {value!r}")
    return list(value)


def check_widths(value: Any, name: str, what: str = "widths", allow_empty: bool = False) -> list[int]:
    """A list or tuple of positive integers (layer widths), non-empty unless ``allow_empty``."""
    widths = check_sequence(value, name, f"{what} (positive integers)")
    if not widths and not allow_empty:
        raise ValueError(f"{name} must list at least one width ({what}), got none")
    for i, width in enumerate(widths):
        check_positive_int(width, f"{name}[{i}]")
    return widths


def check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_rate(value: Any, name: str) -> float:
    """A learning rate as an optimiser holds it: finite and >= 0 (schedules end at 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_batch_pair(batch: Any, what: str) -> None:
    """A batch is an (inputs, labels) pair."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{what} must be an (inputs, labels) pair, got {type(batch).__name__}")
