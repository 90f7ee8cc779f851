"""Claim 4 of the papers: a trained AL network can answer early, at a shortcut depth, and
adaptive inference trades accuracy for depth by a confidence threshold.

    python experiments/early_exit.py            (about a minute on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 8000 train / 2000 test, stratified,
seed 0. Model: ALMLP with four blocks of width 256 (label width 256, bridges 1280), Adam
lr 1e-3, batch 32. The cost of a path is its FLOPs per sample (torch's FlopCounterMode):
adaptive inference pays, at every depth it tries, the bridge and the whole decoder chain
h_k ... h_1 to read its confidence, not only the blocks it passes through. Writes
experiments/results/early_exit.{json,png} and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from torch.utils.flop_counter import FlopCounterMode

import al_ext

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

THRESHOLDS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]


def flops_of(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(FLOPs of module(x) per sample, its output), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops() / x.shape[0], out


def path_costs(model: al_ext.AssociatedLearning, x: torch.Tensor) -> dict[str, list[float]]:
    """Per depth k, FLOPs per sample of: the encoder f_k, the bridge b_k, and decoding from
    depth k (h_k ... h_1), measured on the samples ``x``."""
    costs: dict[str, list[float]] = {"f": [], "b": [], "decode": []}
    s = model.check_input(x)
    with torch.no_grad():
        for k, block in enumerate(model.blocks, start=1):
            f, s = flops_of(block.f, s)
            b, t = flops_of(block.b, s)
            decode = 0.0
            for inner in reversed(model.blocks[:k]):
                h, t = flops_of(inner.h, t)
                decode += h
            costs["f"].append(f)
            costs["b"].append(b)
            costs["decode"].append(decode)
    return costs


def shortcut_flops(costs: dict[str, list[float]], depth: int) -> float:
    """The shortcut path of ``depth``: f_1..f_depth, then b_depth and h_depth..h_1."""
    return sum(costs["f"][:depth]) + costs["b"][depth - 1] + costs["decode"][depth - 1]


def adaptive_flops(costs: dict[str, list[float]], depths: torch.Tensor) -> float:
    """Adaptive inference, per sample on average: a sample leaving at depth d ran f_1..f_d and,
    to check its confidence at every depth k <= d, b_k and h_k..h_1."""
    per_exit = [sum(costs["f"][:d]) + sum(costs["b"][:d]) + sum(costs["decode"][:d])
                for d in range(1, len(costs["f"]) + 1)]
    return float(sum(per_exit[int(d) - 1] for d in depths) / len(depths))


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
    costs = path_costs(model, x_test[:8])
    shortcut_cost = [shortcut_flops(costs, k) for k in range(1, model.depth + 1)]
    adaptive = []
    for threshold in THRESHOLDS:
        classes, depths = model.predict_adaptive(x_test, threshold)
        adaptive.append({"threshold": threshold, "accuracy": (classes == y_test).double().mean().item(),
                         "mean_depth": depths.double().mean().item(), "mflops": adaptive_flops(costs, depths) / 1e6})
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_exit.json").write_text(json.dumps(
        {"shortcut_accuracy": shortcut, "shortcut_mflops": [c / 1e6 for c in shortcut_cost], "adaptive": adaptive,
         "epochs": args.epochs, "seconds": seconds}, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c / 1e6 for c in shortcut_cost], shortcut, "s--", label="shortcut path of depth k")
    ax.plot([r["mflops"] for r in adaptive], [r["accuracy"] for r in adaptive], "o-", label="adaptive (threshold)")
    for r in adaptive:
        ax.annotate(f"{r['threshold']:g}", (r["mflops"], r["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set_xlabel("MFLOPs per sample (adaptive: the exit checks included)")
    ax.set_ylabel("test accuracy")
    low = min(shortcut + [r["accuracy"] for r in adaptive])
    ax.set_ylim(min(0.9, low - 0.02), 1.0)  # a wide axis: do not make a few test samples look like a trend
    ax.set_title("Early exit: ALMLP, 4 blocks, MNIST-test split 8000/2000")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "early_exit.png", dpi=120)

    print("| path | blocks used (mean) | MFLOPs per sample | test accuracy |")
    print("| --- | ---: | ---: | ---: |")
    for k, (acc, cost) in enumerate(zip(shortcut, shortcut_cost), start=1):
        print(f"| shortcut, depth {k} | {k} | {cost / 1e6:.2f} | {acc:.4f} |")
    for r in adaptive:
        print(f"| adaptive, threshold {r['threshold']:g} | {r['mean_depth']:.2f} | {r['mflops']:.2f} | {r['accuracy']:.4f} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
