"""bf16 training lands where float32 training does: ALMLP and ALCNN on the MNIST-test split,
three seeds, each model trained in float32 and in bf16 from the same initial weights.

    python experiments/bf16_accuracy.py         (about 10 minutes on 2 CPU cores)

Data and models as in experiments/al_vs_bp.py (experiments/seeded_mnist.py): the MNIST test set, 7000 train / 1000
validation / 2000 test (split seed 0); ALMLP at the NECO widths, ALCNN at half of them;
Adam lr 1e-3 (AL's (g, h) at 2e-3), batch 32, model seeds 0, 1, 2. float32 trains with the
Trainer's default engine (the fused step for ALMLP); bf16 with precision="bf16", which for
ALMLP is the fused step with bf16 GEMMs (compute_dtype=torch.bfloat16, where the CPU has bf16
hardware) and for ALCNN autocast: both keep float32 master weights, Adam state and losses. The best epoch is chosen on validation only.
Writes experiments/results/bf16_accuracy.json and prints a table.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

import al_ext
from seeded_mnist import MODELS, mean_sd, mnist_split, parse_args, accuracies_on_test

PRECISIONS = ("fp32", "bf16")


def run(model: torch.nn.Module, parts: al_ext.data.DatasetSplits, epochs: int, precision: str) -> dict[str, float]:
    trainer = al_ext.Trainer(model, lr=1e-3, batch_size=32, precision=precision, progress=False)
    start = time.perf_counter()
    history = trainer.fit(parts.train, parts.val, epochs=epochs)
    return {**accuracies_on_test(trainer, parts),
            "samples_per_s": statistics.mean(r["samples_per_s"] for r in history),
            "seconds": time.perf_counter() - start}


def main() -> None:
    args = parse_args(__doc__)
    start = time.perf_counter()
    parts = mnist_split()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name, (make, epochs) in MODELS.items():
        for seed in args.seeds:
            torch.manual_seed(seed)
            first = make()
            for precision in PRECISIONS:
                model = make()
                model.load_state_dict(first.state_dict())
                results.setdefault(name, {}).setdefault(precision, []).append(run(model, parts, epochs, precision))
                print(f"{name} seed {seed} {precision}: {results[name][precision][-1]}", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_accuracy.json").write_text(json.dumps({"seeds": args.seeds, "results": results,
                                                             "seconds": seconds}, indent=2))

    print(f"\n| model | epochs | precision | test % final | test % at best val | samples/s |  (mean ± sd over "
          f"{len(args.seeds)} seeds)")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, (_, epochs) in MODELS.items():
        for precision in PRECISIONS:
            runs = results[name][precision]
            print(f"| {name} | {epochs} | {precision} | {mean_sd(runs, 'final')} | {mean_sd(runs, 'at_best_val')} | "
                  f"{mean_sd(runs, 'samples_per_s', 1.0, 0)} |")
    print(f"took {seconds:.0f} s")


if __name__ == "__main__":
    main()
