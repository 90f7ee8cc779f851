"""Loaders for the papers' datasets in their standard on-disk formats, tested on small files
written here (the real sets cannot be downloaded on these machines)."""
import numpy as np
import pytest
import torch

from al_ext import data, text


def write_cifar_batch(path, labels, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], images], axis=1)
    path.write_bytes(records.tobytes())
    return images.reshape(-1, 3, 32, 32)


def test_cifar10_binary_batches(tmp_path):
    expected = [write_cifar_batch(tmp_path / f"data_batch_{i}.bin", [i, 9, 0], seed=i) for i in range(1, 6)]
    write_cifar_batch(tmp_path / "test_batch.bin", [3, 4])
    x, y = data.load_cifar10(tmp_path, "train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [1, 9, 0, 2, 9, 0, 3, 9, 0, 4, 9, 0, 5, 9, 0]
    assert torch.equal((x[:3] * 255).round().to(torch.uint8), torch.from_numpy(expected[0]))
    assert data.load_cifar10(tmp_path, "test")[0].shape == (2, 3, 32, 32)


def test_cifar10_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        data.load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch.bin").write_bytes(b"\0" * 3072)
    with pytest.raises(ValueError, match="not a whole number of 3073-byte records"):
        data.load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch.bin").write_bytes(bytes([12]) + b"\0" * 3072)
    with pytest.raises(ValueError, match="a label byte is 12"):
        data.load_cifar10(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be"):
        data.load_cifar10(tmp_path, "valid")


def test_ag_news_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green again."\n'
                    '"1","Talks on Iraq","Diplomats meet, with ""quotes"" inside."\n', encoding="utf-8")
    texts, labels = text.load_ag_news(path)
    assert labels.tolist() == [2, 0]
    assert texts[1] == 'Talks on Iraq. Diplomats meet, with "quotes" inside.'
    path.write_text('"5","x","y"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="row 1: expected class index 1-4"):
        text.load_ag_news(path)
    path.write_text('"2","t","d"\n\n"4","u","e"\n\n', encoding="utf-8")  # blank lines are no rows
    assert text.load_ag_news(path)[1].tolist() == [1, 3]


def test_imdb_folder(tmp_path):
    for split in ("train", "test"):
        for polarity, reviews in (("neg", ["Dull.<br />Very dull."]), ("pos", ["Great film!", "Loved it"])):
            folder = tmp_path / "aclImdb" / split / polarity
            folder.mkdir(parents=True)
            for i, review in enumerate(reviews):
                (folder / f"{i}_7.txt").write_text(review, encoding="utf-8")
    texts, labels = text.load_imdb(tmp_path / "aclImdb", "train")
    assert labels.tolist() == [0, 1, 1] and texts[1] == "Great film!"
    with pytest.raises(FileNotFoundError, match="IMDB folder not found"):
        text.load_imdb(tmp_path, "train")
    (tmp_path / "aclImdb" / "test" / "pos" / "9_1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"9_1.txt: not UTF-8 text"):
        text.load_imdb(tmp_path / "aclImdb", "test")


def test_vocabulary_encodes_padded_ids():
    vocab = text.Vocabulary(["the film was great", "the film was dull<br />dull"], max_size=5)
    assert vocab.tokens[:2] == ["<pad>", "<unk>"] and len(vocab) == 5
    assert vocab.tokens[2:] == ["dull", "film", "the"]  # by count, then alphabetically
    ids = vocab.encode(["The film, great!", "dull " * 10], length=4)
    assert ids.tolist() == [[4, 3, 1, 0], [2, 2, 2, 2]]
    assert text.tokenize("It's <br />A b2b") == ["it's", "a", "b2b"]
