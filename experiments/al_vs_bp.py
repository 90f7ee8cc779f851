"""Claim 1 of the papers: AL is about as accurate as back-propagation (BP) on the same
inference path. Several seeds, mean and spread, final and best-on-validation accuracy.

    python experiments/al_vs_bp.py              (about 10 minutes on 2 CPU cores)

Data: the MNIST test set (../shared/data/mnist-test), 7000 train / 1000 validation / 2000
test, stratified; the split's seed is fixed (0), the model seeds are 0, 1, 2. Models:
ALMLP at the NECO widths (784-1024-1024, label 1024, bridges 5120); ALCNN at half the NECO
widths so that it runs in minutes here ((16,16),(16,16),(32,32),(32,32), label 128,
bridges 640). Each BP baseline starts from its AL model's weights. Adam lr 1e-3 (AL's (g, h)
at 2e-3), batch 32. The best epoch is chosen on validation only. Writes
experiments/results/al_vs_bp.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import al_ext
from al_ext.models import ALCNN

MODELS = {
    "ALMLP": (lambda: al_ext.ALMLP(784, 10), 5),
    "ALCNN (half width)": (lambda: ALCNN(channels=((16, 16), (16, 16), (32, 32), (32, 32)), label_dim=128), 3),
}


def run(model: torch.nn.Module, parts: al_ext.data.DatasetSplits, epochs: int) -> dict[str, float]:
    trainer = al_ext.Trainer(model, lr=1e-3, batch_size=32, progress=False)
    trainer.fit(parts.train, parts.val, epochs=epochs)
    final = trainer.evaluate(parts.test)["accuracy"]
    trainer.restore_best()
    return {"final": final, "at_best_val": trainer.evaluate(parts.test)["accuracy"], "best_epoch": trainer.best["epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y = al_ext.data.load_mnist_test()
    parts = al_ext.data.split_dataset(x, y, val=1000, test=2000, seed=0)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name, (make, epochs) in MODELS.items():
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = make()
            baseline = al_ext.bp_baseline(model)
            for tag, net in (("AL", model), ("BP", baseline)):
                results.setdefault(name, {}).setdefault(tag, []).append(run(net, parts, epochs))
            print(f"{name} seed {seed}: AL {results[name]['AL'][-1]}, BP {results[name]['BP'][-1]}", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "al_vs_bp.json").write_text(json.dumps({"seeds": args.seeds, "results": results, "seconds": seconds},
                                                       indent=2))

    def summary(runs: list[dict[str, float]], key: str) -> str:
        values = [100 * r[key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {spread:.2f}"

    print(f"\n| model | epochs | AL final | BP final | AL at best val | BP at best val |  (test %, mean ± sd over "
          f"{len(args.seeds)} seeds)")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, epochs) in MODELS.items():
        al, bp = results[name]["AL"], results[name]["BP"]
        print(f"| {name} | {epochs} | {summary(al, 'final')} | {summary(bp, 'final')} | {summary(al, 'at_best_val')} | "
              f"{summary(bp, 'at_best_val')} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
