"""Pipelined AL training against the sequential loop, in one process and one run.

    python -m pytest benchmarks/test_bench_pipeline.py --benchmark-only --benchmark-columns=mean,rounds -s

For each model and batch size, one epoch of the same batches is trained three ways, every
block with its fused step (FusedBlockAdam):
- python:     the sequential loop in Python (what Trainer does without pipeline=True);
- sequential: the C++ scheduler's sequential mode, all intra-op threads on each step;
- pipeline:   all stages at once on consecutive batches, one stage (a worker running a
              group of consecutive blocks, balanced by measured cost) per core;
- per-block:  the same with one stage per block, more workers than cores when L > cores.
The summary (shown with -s) gives samples/s, the ratio to the C++ sequential mode, each
stage's idle (bubble) fraction, and the ideal ratio: the sum of the blocks' busy times
over the largest, measured in the sequential mode (what L workers could reach).
"""
from __future__ import annotations

import pytest
import torch

import al_ext
from al_ext import Pipeline
from al_ext.fused import FusedBlockAdam

BATCHES = 48
# (name, in_features, hidden widths, label width, batch): equal-cost blocks (width 256,
# bridges 1280, inputs as wide as the blocks) for L = 2, 4, 8, and the NECO MNIST MLP.
CASES = [
    ("L2-equal", 256, (256,) * 2, 256, 32),
    ("L4-equal", 256, (256,) * 4, 256, 32),
    ("L4-equal", 256, (256,) * 4, 256, 128),
    ("L8-equal", 256, (256,) * 8, 256, 32),
    ("NECO-MLP", 784, (1024, 1024), 1024, 32),
    ("NECO-MLP", 784, (1024, 1024), 1024, 128),
]


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, int], dict[str, dict]] = {}
    yield table
    print(f"\n{BATCHES} batches per epoch, {torch.get_num_threads()} cores")
    print("| model | batch | mode | samples/s | x sequential | stage idle fractions | ideal ratio |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: |")
    for (name, batch), modes in table.items():
        seq = modes.get("sequential", {}).get("samples_per_s")
        for mode, r in modes.items():
            ratio = f"{r['samples_per_s'] / seq:.2f}" if seq else "-"
            idle = " ".join(f"{v:.2f}" for v in r.get("idle", [])) or "-"
            ideal = f"{r['ideal']:.2f}" if "ideal" in r else "-"
            print(f"| {name} | {batch} | {mode} | {r['samples_per_s']:,.0f} | {ratio} | {idle} | {ideal} |")


def setup(in_features, hidden, label_dim, batch):
    torch.manual_seed(0)
    model = al_ext.ALMLP(in_features, 10, hidden=hidden, label_dim=label_dim, backend="fused")
    opts = [FusedBlockAdam(b, 1e-4, 2e-4) for b in model.blocks]
    x = torch.rand(BATCHES * batch, in_features)
    y = torch.randint(0, 10, (BATCHES * batch,))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]
    return model, opts, batches


# Modes vary fastest, so that the runs compared run back to back (the machine's speed drifts).
@pytest.mark.parametrize("mode", ["python", "sequential", "pipeline", "per-block"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[4]}")
def test_epoch(benchmark, results, case, mode):
    name, in_features, hidden, label_dim, batch = case
    model, opts, batches = setup(in_features, hidden, label_dim, batch)
    stats = {}
    if mode == "python":
        prepared = [(x, model.label_targets(y)) for x, y in batches]

        def epoch():
            for s, t in prepared:
                for opt in opts:
                    s, t, _, _ = opt.train_step(s, t)
    else:
        stages = len(hidden) if mode == "per-block" else None
        pipeline = Pipeline(model, opts, pipelined=mode != "sequential", stages=stages)

        def epoch():
            stats["run"] = pipeline.run(batches)
    epoch()  # warm-up
    benchmark.group = f"{name}, batch {batch}"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    record = {"samples_per_s": BATCHES * batch / benchmark.stats.stats.mean}
    if "run" in stats:
        run = stats["run"]
        if mode == "sequential":
            busy = [b["busy_s"] for b in run.blocks]
            record["ideal"] = sum(busy) / max(busy)
        else:
            record["idle"] = [s["idle_fraction"] for s in run.stages]
    benchmark.extra_info.update(record)
    results.setdefault((name, batch), {})[mode] = record
