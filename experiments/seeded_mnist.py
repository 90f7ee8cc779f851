"""What the several-seed MNIST experiments share (al_vs_bp.py, bf16_accuracy.py): the split,
the two models at the sizes this machine runs in minutes, the command line and the summary."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import al_ext
from al_ext.models import ALCNN

# name: (model builder, epochs). ALMLP at the NECO widths (784-1024-1024, label 1024, bridges
# 5120); ALCNN at half the NECO widths ((16,16),(16,16),(32,32),(32,32), label 128, bridges 640).
MODELS = {
    "ALMLP": (lambda: al_ext.ALMLP(784, 10), 5),
    "ALCNN (half width)": (lambda: ALCNN(channels=((16, 16), (16, 16), (32, 32), (32, 32)), label_dim=128), 3),
}


def mnist_split() -> al_ext.data.DatasetSplits:
    """The MNIST test set as 7000 train / 1000 validation / 2000 test, stratified, split seed 0."""
    x, y = al_ext.data.load_mnist_test()
    return al_ext.data.split_dataset(x, y, val=1000, test=2000, seed=0)


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def mean_sd(runs: list[dict[str, float]], key: str, scale: float = 100.0, digits: int = 2) -> str:
    """"mean ± sd" of ``key`` over the runs (accuracies as percentages by default)."""
    values = [scale * r[key] for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def accuracies_on_test(trainer: al_ext.Trainer, parts: al_ext.data.DatasetSplits) -> dict[str, float]:
    """Test accuracy after the last epoch and at the best epoch on validation (whose weights
    the trainer keeps afterwards)."""
    final = trainer.evaluate(parts.test)["accuracy"]
    trainer.restore_best()
    return {"final": final, "at_best_val": trainer.evaluate(parts.test)["accuracy"], "best_epoch": trainer.best["epoch"]}
