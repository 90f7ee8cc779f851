"""IDX reading (and refusing corrupt files), the embedded digits, and the stratified split."""
import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from al_ext import data

MNIST = data.MNIST_TEST_DIR


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


@pytest.mark.parametrize(
    "array,code",
    [
        (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-3, 0, 7], dtype=np.int8), 0x09),
        (np.array([[-300, 2], [5, 30000]], dtype=np.int16), 0x0B),
        (np.array([1, -(2**31), 2**31 - 1], dtype=np.int32), 0x0C),
        (np.array([[0.5, -1.25]], dtype=np.float32), 0x0D),
        (np.array([np.pi, -np.e], dtype=np.float64), 0x0E),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_idx_round_trip(tmp_path, array, code, compressed):
    raw = idx_bytes(array, code)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    loaded = data.load_idx(path)
    assert loaded.shape == array.shape
    assert np.array_equal(loaded.numpy(), array)


@pytest.mark.parametrize(
    "mangle,message",
    [
        (lambda raw: raw[:-1], "truncated: shape"),
        (lambda raw: raw + b"\0", "has trailing bytes"),
        (lambda raw: raw[:6], "truncated header"),
        (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX element type 0x07"),
        (lambda raw: b"", "not an IDX file"),
        (lambda raw: gzip.compress(raw)[:-12], "corrupt or truncated gzip"),
        (lambda raw: gzip.compress(raw)[:12] + b"garbage" * 3, "corrupt or truncated gzip"),
    ],
)
def test_corrupt_idx_is_refused_with_the_reason(tmp_path, mangle, message):
    raw = idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8), 0x08)
    path = tmp_path / "bad.idx"
    path.write_bytes(mangle(raw))
    with pytest.raises(data.IdxFormatError, match=message):
        data.load_idx(path)


def test_missing_idx_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        data.load_idx(tmp_path / "nope.idx")


def test_idx_pair_checks_that_images_and_labels_agree(tmp_path):
    (tmp_path / "x.idx").write_bytes(idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8), 0x08))
    (tmp_path / "y.idx").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8), 0x08))
    with pytest.raises(data.IdxFormatError, match="holds 4 labels for the 3 images"):
        data.load_idx_pair(tmp_path / "x.idx", tmp_path / "y.idx")
    with pytest.raises(data.IdxFormatError, match="expected 3-D uint8 images"):
        data.load_idx_pair(tmp_path / "y.idx", tmp_path / "y.idx")
    for labels, code in ((np.array([1.7, 0.0, 2.0], dtype=np.float32), 0x0D), (np.array([1, -3, 2], dtype=np.int8), 0x09)):
        (tmp_path / "y.idx").write_bytes(idx_bytes(labels, code))  # 1.7 would become class 1, -3 no class at all
        with pytest.raises(data.IdxFormatError, match="expected class indices"):
            data.load_idx_pair(tmp_path / "x.idx", tmp_path / "y.idx")


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"the MNIST test set is not at {MNIST}")
def test_mnist_test_set_loads_and_matches_its_checksums():
    for line in (MNIST / "MD5SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.md5((MNIST / name).read_bytes()).hexdigest() == digest
    x, y = data.load_mnist_test()
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() == 1.0
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_digits():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and y.shape == (1797,) and x.max() == 1.0 and set(y.tolist()) == set(range(10))


def test_stratified_split_sizes_shares_and_seed():
    y = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    split = data.stratified_split(y, val=0.1, test=200, seed=3)
    assert (split.train.numel(), split.val.numel(), split.test.numel()) == (700, 100, 200)
    everything = torch.cat([split.train, split.val, split.test]).sort().values
    assert torch.equal(everything, torch.arange(1000)), "parts must be disjoint and cover every sample"
    assert torch.bincount(y[split.test]).tolist() == [100, 60, 40]
    assert torch.bincount(y[split.val]).tolist() == [50, 30, 20]
    again = data.stratified_split(y, val=0.1, test=200, seed=3)
    other = data.stratified_split(y, val=0.1, test=200, seed=4)
    assert torch.equal(split.test, again.test) and not torch.equal(split.test, other.test)


def test_split_sizes_may_be_numpy_numbers():
    split = data.stratified_split(torch.arange(100) % 4, val=np.int64(10), test=np.float32(0.2))
    assert (split.val.numel(), split.test.numel()) == (10, 20)
    with pytest.raises(ValueError, match="x must hold samples along its first dimension, got a 0-d tensor"):
        data.split_dataset(torch.tensor(1.0), torch.arange(4))


def test_split_dataset_of_mnist_sizes():
    y = torch.arange(10000) % 10
    parts = data.split_dataset(torch.zeros(10000, 1), y, val=0, test=0.2, seed=0)
    assert parts.val is None and parts.train[0].shape[0] == 8000 and parts.test[0].shape[0] == 2000
    assert torch.bincount(parts.test[1]).tolist() == [200] * 10


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"test": 1.5}, ValueError, r"test as a fraction must lie in \[0, 1\)"),
        ({"val": -2}, ValueError, "val as a count must lie in"),
        ({"val": 0.5, "test": 0.5}, ValueError, "leave no training samples"),
        ({"test": "half"}, TypeError, "test must be a fraction"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"seed": 0.5}, TypeError, "seed must be an integer >= 0, got 0.5"),
    ],
)
def test_bad_split_sizes(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.stratified_split(torch.arange(100) % 4, **kwargs)
