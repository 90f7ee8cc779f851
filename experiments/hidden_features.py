"""Claim 3 of the papers: AL's hidden features separate the classes better than those of the
same network trained with back-propagation (BP).

    python experiments/hidden_features.py       (about a minute on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 8000 train / 2000 test, stratified,
seed 0; the features are measured on the 2000 test images. Model: ALMLP with four blocks
of width 256 (label 256, bridges 1280) and its BP baseline from the same weights, Adam lr
1e-3, batch 32, 5 epochs. For each block's x-side output (AL) and the same layer of the BP
network: the mean distance between class centroids over the mean distance of a sample to
its own class centroid (higher: classes further apart for their spread; scale-free), and a
2-D PCA plot. Writes experiments/results/hidden_features.{json,png} and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from torch import Tensor

import al_ext

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def separation(features: Tensor, labels: Tensor) -> dict[str, float]:
    classes = labels.unique()
    centroids = torch.stack([features[labels == c].mean(0) for c in classes])
    intra = torch.cat([(features[labels == c] - centroids[i]).norm(dim=1) for i, c in enumerate(classes)]).mean()
    pairs = torch.pdist(centroids)
    return {"intra": intra.item(), "inter": pairs.mean().item(), "ratio": (pairs.mean() / intra).item()}


def pca_2d(features: Tensor) -> Tensor:
    centred = features - features.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=2, center=False)
    return centred @ v[:, :2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = al_ext.data.load_mnist_test()
    parts = al_ext.data.split_dataset(x, y, val=0, test=2000, seed=0)
    torch.manual_seed(0)
    model = al_ext.ALMLP(784, 10, hidden=(256,) * 4, label_dim=256)
    baseline = al_ext.bp_baseline(model)
    for net in (model, baseline):
        al_ext.Trainer(net, lr=1e-3, batch_size=32, progress=False).fit(parts.train, epochs=args.epochs)
    x_test, y_test = parts.test
    features: dict[str, list[Tensor]] = {"AL": [], "BP": []}
    with torch.no_grad():
        for name, encoders in (("AL", [b.f for b in model.blocks]), ("BP", list(baseline.encoders))):
            s = x_test
            for f in encoders:
                s = f(s)
                features[name].append(s)
    table = {name: [separation(f, y_test) for f in feats] for name, feats in features.items()}
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hidden_features.json").write_text(json.dumps({**table, "seconds": seconds}, indent=2))

    depth = len(model.blocks)
    fig, axes = plt.subplots(2, depth, figsize=(3 * depth, 6))
    shown = torch.arange(0, x_test.shape[0], 4)  # 500 points per panel
    for row, name in enumerate(("AL", "BP")):
        for k, feats in enumerate(features[name]):
            xy = pca_2d(feats)[shown]
            ax = axes[row, k]
            ax.scatter(xy[:, 0], xy[:, 1], c=y_test[shown], cmap="tab10", s=4)
            ax.set_title(f"{name}, block {k + 1}: ratio {table[name][k]['ratio']:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Hidden features, 2-D PCA of the MNIST-test split's 2000 test images (colour = class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "hidden_features.png", dpi=110)

    print("| block | AL inter/intra | BP inter/intra |")
    print("| ---: | ---: | ---: |")
    for k in range(depth):
        print(f"| {k + 1} | {table['AL'][k]['ratio']:.3f} | {table['BP'][k]['ratio']:.3f} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
