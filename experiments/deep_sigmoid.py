"""Claim 2 of the papers: a deep network with sigmoid activations trains with AL, where the
same network trained end to end with back-propagation stalls.

    python experiments/deep_sigmoid.py          (about two minutes on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 7000 train / 1000 validation / 2000
test, stratified, seed 0. Model: ALMLP with ten blocks, x side Linear + sigmoid of width
128, label width 128, bridges 256; the BP baseline is its inference path (ten sigmoid
layers, the last bridge, ten decoders), from the same initial weights. Both: Adam lr 1e-3,
batch 32. Writes experiments/results/deep_sigmoid.{json,png} and prints a table.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = al_ext.data.load_mnist_test()
    parts = al_ext.data.split_dataset(x, y, val=1000, test=2000, seed=0)
    torch.manual_seed(0)
    model = al_ext.ALMLP(784, 10, hidden=(128,) * args.blocks, label_dim=128, bridge_factor=2, activation="sigmoid")
    baseline = al_ext.bp_baseline(model)
    runs = {}
    for name, net in (("AL", model), ("BP", baseline)):
        trainer = al_ext.Trainer(net, lr=1e-3, batch_size=32, progress=False)
        history = trainer.fit(parts.train, parts.val, epochs=args.epochs)
        test = trainer.evaluate(parts.test)
        runs[name] = {"val_accuracy": [r["val_accuracy"] for r in history], "test_accuracy": test["accuracy"]}
        if name == "AL":
            runs[name]["val_shortcut_accuracy"] = [r["val_shortcut_accuracy"] for r in history]
            runs[name]["test_shortcut_accuracy"] = test["shortcut_accuracy"]
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deep_sigmoid.json").write_text(json.dumps({**runs, "epochs": args.epochs, "seconds": seconds}, indent=2))
    epochs = range(1, args.epochs + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, runs["BP"]["val_accuracy"], "o-", label="BP, end to end")
    ax.plot(epochs, runs["AL"]["val_accuracy"], "s-", label=f"AL, full path ({args.blocks} blocks)")
    best = [max(per_depth) for per_depth in runs["AL"]["val_shortcut_accuracy"]]
    ax.plot(epochs, best, "^--", label="AL, best shortcut depth")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.blocks}-block sigmoid MLP, MNIST-test split 7000/1000/2000")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "deep_sigmoid.png", dpi=120)

    print("| epoch | BP val acc | AL val acc (full path) | AL val acc (best depth) |")
    print("| ---: | ---: | ---: | ---: |")
    for e, bp, al, b in zip(epochs, runs["BP"]["val_accuracy"], runs["AL"]["val_accuracy"], best):
        print(f"| {e} | {bp:.4f} | {al:.4f} | {b:.4f} |")
    shortcut = " ".join(f"{a:.3f}" for a in runs["AL"]["test_shortcut_accuracy"])
    print(f"test accuracy: BP {runs['BP']['test_accuracy']:.4f}, AL full path {runs['AL']['test_accuracy']:.4f}; "
          f"AL by depth: {shortcut}")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
