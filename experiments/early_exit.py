"""Claim 4 of the papers: a trained AL network can answer early, at a shortcut depth, and
adaptive inference trades accuracy for depth by a confidence threshold.

    python experiments/early_exit.py            (about a minute on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 8000 train / 2000 test, stratified,
seed 0. Model: ALMLP with four blocks of width 256 (label width 256, bridges 1280), Adam
lr 1e-3, batch 32. Writes experiments/results/early_exit.{json,png} and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch

import al_ext

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

THRESHOLDS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = al_ext.data.load_mnist_test()
    parts = al_ext.data.split_dataset(x, y, val=0, test=2000, seed=0)
    torch.manual_seed(0)
    model = al_ext.ALMLP(784, 10, hidden=(256,) * 4, label_dim=256)
    trainer = al_ext.Trainer(model, lr=1e-3, batch_size=32, progress=False)
    trainer.fit(parts.train, epochs=args.epochs)
    shortcut = trainer.evaluate(parts.test)["shortcut_accuracy"]
    x_test, y_test = parts.test
    model.eval()
    adaptive = []
    for threshold in THRESHOLDS:
        classes, depths = model.predict_adaptive(x_test, threshold)
        adaptive.append({"threshold": threshold, "accuracy": (classes == y_test).double().mean().item(),
                         "mean_depth": depths.double().mean().item()})
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_exit.json").write_text(json.dumps(
        {"shortcut_accuracy": shortcut, "adaptive": adaptive, "epochs": args.epochs, "seconds": seconds}, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(shortcut) + 1), shortcut, "s--", label="shortcut path of depth k")
    ax.plot([r["mean_depth"] for r in adaptive], [r["accuracy"] for r in adaptive], "o-", label="adaptive (threshold)")
    for r in adaptive:
        ax.annotate(f"{r['threshold']:g}", (r["mean_depth"], r["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set_xlabel("blocks used per sample (mean)")
    ax.set_ylabel("test accuracy")
    low = min(shortcut + [r["accuracy"] for r in adaptive])
    ax.set_ylim(min(0.9, low - 0.02), 1.0)  # a wide axis: do not make a few test samples look like a trend
    ax.set_title("Early exit: ALMLP, 4 blocks, MNIST-test split 8000/2000")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "early_exit.png", dpi=120)

    print("| path | blocks used (mean) | test accuracy |")
    print("| --- | ---: | ---: |")
    for k, acc in enumerate(shortcut, start=1):
        print(f"| shortcut, depth {k} | {k} | {acc:.4f} |")
    for r in adaptive:
        print(f"| adaptive, threshold {r['threshold']:g} | {r['mean_depth']:.2f} | {r['accuracy']:.4f} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
