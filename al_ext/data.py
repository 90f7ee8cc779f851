"""Datasets that need no download: IDX files (MNIST's format) and scikit-learn's digits,
with a seeded, stratified train / validation / test split."""
from __future__ import annotations

import gzip
import math
import numbers
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .validation import check_labels, check_tensor

# IDX type codes (third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# The MNIST test set beside a source checkout (../shared/data/mnist-test); AL_EXT_MNIST_DIR overrides.
MNIST_TEST_DIR = Path(os.environ.get("AL_EXT_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-test"))

Dataset = tuple[Tensor, Tensor]


class IdxFormatError(ValueError):
    """An IDX file is corrupt, truncated or not an IDX file at all."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def load_idx(path: str | Path) -> Tensor:
    """Read an IDX file (gzip-compressed or not) into a tensor of its stored shape and type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: not an IDX file (expected a magic number 0x0000TTNN, got {raw[:4].hex()})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise IdxFormatError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header (expected {header} bytes, got {len(raw)})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise IdxFormatError(f"{path}: {what}: shape {shape} needs {expected} bytes of data, found {found}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def load_idx_pair(images: str | Path, labels: str | Path) -> Dataset:
    """An image classification set in IDX format (MNIST's): X float32 in [0, 1] with one row
    of H*W pixels per image, y int64."""
    x, y = load_idx(images), load_idx(labels)
    if x.dim() != 3 or x.dtype != torch.uint8:
        raise IdxFormatError(f"{images}: expected 3-D uint8 images (N, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise IdxFormatError(f"{labels}: expected 1-D labels, got shape {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise IdxFormatError(f"{labels}: holds {y.shape[0]} labels for the {x.shape[0]} images of {images}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise IdxFormatError(f"{images}: holds no images (shape {tuple(x.shape)})")
    if y.dtype.is_floating_point or (y.numel() and int(y.min()) < 0):
        values = f" from {y.min().item()} to {y.max().item()}" if y.numel() else ""
        raise IdxFormatError(f"{labels}: expected class indices (integers from 0), got {y.dtype} values{values}")
    return x.reshape(x.shape[0], -1).float().div_(255.0), y.long()


def load_mnist_test(directory: str | Path = MNIST_TEST_DIR) -> Dataset:
    """The MNIST test set (10,000 images) from ../shared/data/mnist-test."""
    directory = Path(directory)
    return load_idx_pair(directory / "t10k-images-idx3-ubyte.gz", directory / "t10k-labels-idx1-ubyte.gz")


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, embedded in scikit-learn): X float32 in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)


def _resolve_size(size: float | int, total: int, name: str) -> int:
    # numbers.*, not int and float: numpy's scalars (a count read from an array) are numbers too
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(f"{name} must be a fraction in [0, 1) or a sample count, got {size!r}")
    if isinstance(size, numbers.Integral):
        if not 0 <= size < total:
            raise ValueError(f"{name} as a count must lie in [0, {total}), got {size}")
        return int(size)
    if not 0.0 <= size < 1.0:
        raise ValueError(f"{name} as a fraction must lie in [0, 1), got {size}")
    return round(float(size) * total)


def _allocate(class_counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes in proportion to their counts (largest remainder)."""
    quota = class_counts * total / class_counts.sum()
    share = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - share), kind="stable")
    share[order[: total - share.sum()]] += 1
    return np.minimum(share, class_counts)


@dataclass
class Split:
    """Indices of a stratified split; each sorted."""

    train: Tensor
    val: Tensor
    test: Tensor


def stratified_split(labels: Tensor, val: float | int = 0.1, test: float | int = 0.2, seed: int = 0) -> Split:
    """Seeded split of sample indices that keeps each class's share in every part.

    ``val`` and ``test`` are fractions in [0, 1) or sample counts; the rest is training data.
    """
    labels = check_tensor(labels, "labels")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer >= 0, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    y = check_labels(labels, int(labels.max()) + 1 if labels.numel() else 1, "labels").numpy()
    n = y.shape[0]
    n_test, n_val = _resolve_size(test, n, "test"), _resolve_size(val, n, "val")
    if n_test + n_val >= n:
        raise ValueError(f"val ({n_val}) and test ({n_test}) leave no training samples out of {n}")
    classes, counts = np.unique(y, return_counts=True)
    test_share = _allocate(counts, n_test)
    val_share = np.minimum(_allocate(counts, n_val), counts - test_share)
    untrained = classes[counts - test_share - val_share == 0]
    if untrained.size:
        warnings.warn(f"class(es) {untrained.tolist()} get no training sample (val {n_val} and test {n_test} take "
                      "every one), so the model cannot learn them; give val and test less", UserWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, n_t, n_v in zip(classes, test_share, val_share):
        members = rng.permutation(np.flatnonzero(y == c))
        parts["test"].append(members[:n_t])
        parts["val"].append(members[n_t : n_t + n_v])
        parts["train"].append(members[n_t + n_v :])
    return Split(**{k: torch.from_numpy(np.sort(np.concatenate(v))).long() for k, v in parts.items()})


@dataclass
class DatasetSplits:
    train: Dataset
    val: Dataset | None
    test: Dataset | None


def split_dataset(x: Tensor, y: Tensor, val: float | int = 0.1, test: float | int = 0.2, seed: int = 0) -> DatasetSplits:
    """(x, y) cut by ``stratified_split``; an empty part is None."""
    x, y = check_tensor(x, "x"), check_tensor(y, "y")
    if x.dim() == 0:
        raise ValueError("x must hold samples along its first dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    idx = stratified_split(y, val, test, seed)

    def part(i: Tensor) -> Dataset | None:
        return (x[i], y[i]) if i.numel() else None

    return DatasetSplits(part(idx.train), part(idx.val), part(idx.test))  # type: ignore[arg-type]


CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then the 32x32 image, channel by channel


def load_cifar10(directory: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10 in its binary distribution (cifar-10-batches-bin): data_batch_1..5.bin for
    "train", test_batch.bin for "test". X float32 in [0, 1], shape (N, 3, 32, 32); y int64."""
    directory = Path(directory)
    names = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    if split not in names:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = [], []
    for name in names[split]:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {CIFAR10_RECORD}-byte records")
        records = raw.reshape(-1, CIFAR10_RECORD)
        if records[:, 0].max() > 9:
            raise ValueError(f"{path}: a label byte is {int(records[:, 0].max())}, expected 0-9")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    x = torch.from_numpy(np.concatenate(images)).float().div_(255.0)
    return x, torch.from_numpy(np.concatenate(labels))
