"""Text classification data from disk, no download: AG News (CSV) and IMDB (the aclImdb
folder), and a vocabulary that turns texts into padded token-id tensors."""
from __future__ import annotations

import csv
import numbers
import re
from collections import Counter
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Sequence

import torch
from torch import Tensor

from .validation import check_positive_int

PAD, UNKNOWN = 0, 1
_TOKEN = re.compile(r"(?:[^\W_]|')+")  # letters and digits of any script, and apostrophes

Texts = tuple[list[str], Tensor]


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers; markup such as <br /> becomes separate, dropped tokens."""
    return _TOKEN.findall(text.lower().replace("<br />", " "))


MIN_VOCABULARY = 3  # padding, unknown and one word


def _checked_texts(texts: Any, name: str) -> list[str]:
    """Strings from any iterable of them (a list, a numpy array, a pandas Series); one string
    alone is refused, as it would be read as texts of one character each."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"{name} must be an iterable (a list) of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(text).__name__}")
    return texts


class Vocabulary:
    """Token ids by frequency in the texts it is built from: 0 is padding, 1 unknown."""

    def __init__(self, texts: Sequence[str], max_size: int = 20000, min_count: int = 1) -> None:
        texts = _checked_texts(texts, "texts")
        if check_positive_int(max_size, "max_size") < MIN_VOCABULARY:
            raise ValueError(f"max_size must be at least {MIN_VOCABULARY} (padding, unknown and one word), got {max_size}")
        check_positive_int(min_count, "min_count")
        counts = Counter(token for text in texts for token in tokenize(text))
        kept = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        if not kept:
            raise ValueError(f"texts hold no word seen at least min_count={min_count} times (words are runs of "
                             "letters, digits and apostrophes): every text would encode as padding and unknown words")
        self.tokens = ["<pad>", "<unk>"] + kept[: max_size - 2]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], length: int) -> Tensor:
        """(len(texts), length) int64 ids, cut or padded with PAD at the end."""
        texts = _checked_texts(texts, "texts")
        check_positive_int(length, "length")
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.ids.get(t, UNKNOWN) for t in tokenize(text)][:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def load_ag_news(path: str | Path) -> Texts:
    """AG News as distributed (train.csv / test.csv): rows of class index 1-4, title,
    description, no header. Returns (title + ". " + description for each row, labels 0-3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AG News file not found: {path}")
    texts, labels = [], []
    line = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is no part of row 1
            for line, row in enumerate(csv.reader(fh), start=1):
                if not row:  # a blank line (an editor's trailing newline): no sample
                    continue
                if len(row) != 3 or row[0].strip() not in {"1", "2", "3", "4"}:
                    raise ValueError(f"{path}, row {line}: expected class index 1-4, title, description (3 fields); "
                                     f"got {len(row)} field(s): {str(row)[:200]}")
                texts.append(f"{row[1]}. {row[2]}")
                labels.append(int(row[0]) - 1)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}, after row {line}: not a UTF-8 CSV file of AG News ({exc})") from None
    if not texts:
        raise ValueError(f"{path} holds no rows")
    return texts, torch.tensor(labels, dtype=torch.long)


def load_imdb(directory: str | Path, split: str = "train") -> Texts:
    """IMDB reviews from the aclImdb folder: <split>/neg/*.txt (label 0) and <split>/pos/*.txt
    (label 1), in file-name order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    texts, labels = [], []
    for label, polarity in enumerate(("neg", "pos")):
        folder = Path(directory) / split / polarity
        if not folder.is_dir():
            raise FileNotFoundError(f"IMDB folder not found: {folder}")
        for file in sorted(folder.glob("*.txt")):
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{file}: not UTF-8 text, as IMDB's reviews are ({exc})") from None
            labels.append(label)
    if not texts:
        raise ValueError(f"{Path(directory) / split} holds no reviews")
    return texts, torch.tensor(labels, dtype=torch.long)


MAX_TOPICAL_WORDS = 4


def generated_topics(n: int, num_classes: int = 4, seed: int = 0, length: tuple[int, int] = (8, 24)) -> Texts:
    """A text classification task made here, for machines that can download nothing: each
    text is filler words from a pool every class shares, with 2-4 words of its class's topic
    list mixed in, in random order. Topic lists overlap (half of each list is shared with
    the next class), so a single word is not always enough to decide."""
    check_positive_int(n, "n")
    if check_positive_int(num_classes, "num_classes") < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if (isinstance(length, (str, bytes)) or not isinstance(length, Sequence) or len(length) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in length)
            or not MAX_TOPICAL_WORDS <= length[0] <= length[1]):
        raise ValueError(f"length must be (shortest, longest) words, integers with {MAX_TOPICAL_WORDS} <= shortest "
                         f"<= longest (a text holds up to {MAX_TOPICAL_WORDS} topic words), got {length!r}")
    gen = torch.Generator().manual_seed(seed)
    filler = [f"w{i}" for i in range(200)]
    topics = [[f"t{c}_{i}" for i in range(10)] + [f"t{(c + 1) % num_classes}_{i}" for i in range(5)]
              for c in range(num_classes)]
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(num_classes, (1,), generator=gen))
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
        topical = int(torch.randint(2, MAX_TOPICAL_WORDS + 1, (1,), generator=gen))
        words = [filler[int(i)] for i in torch.randint(len(filler), (size - topical,), generator=gen)]
        words += [topics[label][int(i)] for i in torch.randint(len(topics[label]), (topical,), generator=gen)]
        order = torch.randperm(len(words), generator=gen).tolist()
        texts.append(" ".join(words[i] for i in order))
        labels.append(label)
    return texts, torch.tensor(labels, dtype=torch.long)
