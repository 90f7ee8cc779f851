"""Claim 1 of the papers: AL is about as accurate as back-propagation (BP) on the same
inference path, trained to convergence. Several seeds, mean and spread, final and
best-on-validation accuracy, and how long each run took.

    nice -n 19 python experiments/al_vs_bp.py --models ALMLP --seeds 0      (one chunk)
    python experiments/al_vs_bp.py --table                                 (the table so far)

Data: the MNIST test set (../shared/data/mnist-test), 7000 train / 1000 validation / 2000
test, stratified; the split's seed is fixed (0), the model seeds are 0, 1, 2. Models:
ALMLP at the NECO widths (784-1024-1024, label 1024, bridges 5120); ALCNN at half the NECO
widths so that it runs here ((16,16),(16,16),(32,32),(32,32), label 128, bridges 640). Each
BP baseline starts from its AL model's weights. Adam lr 1e-3 (AL's (g, h) at 2e-3), batch 32,
the NECO step schedule (x0.1 at 40, 60 and 80 % of the run, x0.5 at 90 %), 15 epochs. The
best epoch is chosen on validation only; a run whose best epoch is its last has not
converged, and the table says so. Results are merged into
experiments/results/al_vs_bp.json, so that the runs can go in chunks.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from seeded_mnist import MODELS, accuracies_on_test, mean_sd, mnist_split

import al_ext

EPOCHS = 15
SCHEDULE = "neco"


def run(model: torch.nn.Module, parts: al_ext.data.DatasetSplits, epochs: int) -> dict[str, Any]:
    trainer = al_ext.Trainer(model, lr=1e-3, batch_size=32, schedule=SCHEDULE, progress=False)
    start = time.perf_counter()
    history = trainer.fit(parts.train, parts.val, epochs=epochs)
    seconds = time.perf_counter() - start
    return {**accuracies_on_test(trainer, parts), "seconds": seconds, "epochs": epochs,
            "val_accuracy": [r["val_accuracy"] for r in history]}


def print_table(results: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> None:
    print("| model | epochs | seeds | AL, final | BP, final | AL, best-on-val epoch | BP, best-on-val epoch "
          "| best epochs, AL / BP | minutes per run, AL / BP |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for name in MODELS:
        if name not in results:
            continue
        al, bp = ([runs[seed] for seed in sorted(runs, key=int)] for runs in (results[name][t] for t in ("AL", "BP")))
        best = " ".join(str(r["best_epoch"]) for r in al) + " / " + " ".join(str(r["best_epoch"]) for r in bp)
        minutes = (" ".join(f"{r['seconds'] / 60:.1f}" for r in al) + " / "
                   + " ".join(f"{r['seconds'] / 60:.1f}" for r in bp))
        print(f"| {name} | {al[0]['epochs']} | {len(al)} | {mean_sd(al, 'final')} | {mean_sd(bp, 'final')} "
              f"| {mean_sd(al, 'at_best_val')} | {mean_sd(bp, 'at_best_val')} | {best} | {minutes} |")
    last = [(n, t, s) for n, tags in results.items() for t, seeds in tags.items() for s, r in seeds.items()
            if r["best_epoch"] == r["epochs"]]
    if last:
        print("not converged (best epoch is the last): " + ", ".join(f"{n} {t} seed {s}" for n, t, s in last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "al_vs_bp.json")
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.table:
        parts = mnist_split()
        for name in args.models:
            make, _ = MODELS[name]
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = make()
                baseline = al_ext.bp_baseline(model)
                for tag, net in (("AL", model), ("BP", baseline)):
                    result = run(net, parts, args.epochs)
                    results.setdefault(name, {}).setdefault(tag, {})[str(seed)] = result
                    print(f"{name} seed {seed} {tag}: test {result['final']:.4f} final, {result['at_best_val']:.4f} "
                          f"at best val (epoch {result['best_epoch']}), {result['seconds']:.0f} s", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
