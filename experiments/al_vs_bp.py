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

import json
import time

import torch

import al_ext
from seeded_mnist import MODELS, mean_sd, mnist_split, parse_args, accuracies_on_test


def run(model: torch.nn.Module, parts: al_ext.data.DatasetSplits, epochs: int) -> dict[str, float]:
    trainer = al_ext.Trainer(model, lr=1e-3, batch_size=32, progress=False)
    trainer.fit(parts.train, parts.val, epochs=epochs)
    return accuracies_on_test(trainer, parts)


def main() -> None:
    args = parse_args(__doc__)
    start = time.perf_counter()
    parts = mnist_split()
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

    print(f"\n| model | epochs | AL final | BP final | AL at best val | BP at best val |  (test %, mean ± sd over "
          f"{len(args.seeds)} seeds)")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, epochs) in MODELS.items():
        al, bp = results[name]["AL"], results[name]["BP"]
        print(f"| {name} | {epochs} | {mean_sd(al, 'final')} | {mean_sd(bp, 'final')} | {mean_sd(al, 'at_best_val')} | "
              f"{mean_sd(bp, 'at_best_val')} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
