"""Claim 2 of the papers: a deep network with sigmoid activations trains with AL, where the
same network trained end to end with back-propagation stalls.

    python experiments/deep_sigmoid.py          (about two minutes on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 7000 train / 1000 validation / 2000
test, stratified, seed 0. Model: ALMLP with ten blocks, x side Linear + sigmoid of width
128, label width 128, bridges 256; the BP baseline is its inference path (ten sigmoid
layers, the last bridge, ten decoders). AL: Adam lr 1e-3, batch 32. BP gets every chance
before it is said to stall: Adam at learning rates 1e-4 to 1e-2, from AL's He-normal
weights and from PyTorch's default initialisation, the best of those chosen on validation.
Writes experiments/results/deep_sigmoid.{json,png} and prints a table.
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


BP_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
BP_INITS = ("he_normal", "pytorch_default")


def untrained(blocks: int) -> al_ext.ALMLP:
    """The AL model before training (seed 0, He-normal weights)."""
    torch.manual_seed(0)
    return al_ext.ALMLP(784, 10, hidden=(128,) * blocks, label_dim=128, bridge_factor=2, activation="sigmoid")


def train(net: torch.nn.Module, lr: float, parts: al_ext.data.DatasetSplits, epochs: int) -> dict:
    trainer = al_ext.Trainer(net, lr=lr, batch_size=32, progress=False)
    history = trainer.fit(parts.train, parts.val, epochs=epochs)
    test = trainer.evaluate(parts.test)
    run = {"val_accuracy": [r["val_accuracy"] for r in history], "test_accuracy": test["accuracy"]}
    if "shortcut_accuracy" in test:
        run["val_shortcut_accuracy"] = [r["val_shortcut_accuracy"] for r in history]
        run["test_shortcut_accuracy"] = test["shortcut_accuracy"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = al_ext.data.load_mnist_test()
    parts = al_ext.data.split_dataset(x, y, val=1000, test=2000, seed=0)
    runs = {"AL": train(untrained(args.blocks), 1e-3, parts, args.epochs)}
    sweep = []
    for init in BP_INITS:
        for lr in BP_LEARNING_RATES:
            baseline = al_ext.bp_baseline(untrained(args.blocks))  # AL's initial weights
            if init == "pytorch_default":
                for m in baseline.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.reset_parameters()
            run = train(baseline, lr, parts, args.epochs)
            sweep.append({"init": init, "lr": lr, **run})
            print(f"BP {init} lr {lr:g}: best val {max(run['val_accuracy']):.4f}", flush=True)
    runs["BP"] = max(sweep, key=lambda r: max(r["val_accuracy"]))  # chosen on validation only
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deep_sigmoid.json").write_text(json.dumps({**runs, "bp_sweep": sweep, "epochs": args.epochs,
                                                            "seconds": seconds}, indent=2))
    epochs = range(1, args.epochs + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, runs["BP"]["val_accuracy"], "o-",
            label=f"BP, end to end (best of {len(sweep)}: lr {runs['BP']['lr']:g}, {runs['BP']['init']} init)")
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
    print("| BP init | lr | best val acc | test acc |")
    print("| --- | ---: | ---: | ---: |")
    for r in sweep:
        print(f"| {r['init']} | {r['lr']:g} | {max(r['val_accuracy']):.4f} | {r['test_accuracy']:.4f} |")
    print(f"test accuracy: BP (best on val) {runs['BP']['test_accuracy']:.4f}, AL full path {runs['AL']['test_accuracy']:.4f}; "
          f"AL by depth: {shortcut}")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
