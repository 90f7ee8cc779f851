"""Pipelined AL training against the sequential loop, in one process and one run.

    python -m pytest benchmarks/test_bench_pipeline.py --benchmark-only --benchmark-columns=mean,rounds -s

For each model and batch size, one epoch of the same batches is trained in turn six ways
(benchmarks/interleave.py), every block with its fused step (FusedBlockAdam):
- python:     the sequential loop in Python (what Trainer does without pipeline=True);
- sequential: the C++ scheduler's sequential mode, all intra-op threads on each step;
- seq-1thread: the same on one thread: how much a step gains from the other cores, which
              bounds what the pipeline can gain over the sequential mode (on c cores at
              most c x seq-1thread);
- pipeline:   every block at once on consecutive batches, one worker per core, the
              workers sharing the blocks (the CPU's default);
- stages:     the same with each worker running a fixed group of consecutive blocks
              (a stage, balanced by measured cost): Pipeline(shared=False);
- per-block:  fixed stages of one block each, more workers than cores when L > cores.
The summary (shown with -s) gives samples/s (median epoch), the speed-up over the C++
sequential mode (median of per-round ratios, and best time against best time), each
stage's idle (bubble) fraction, and the ideal ratio: the sum of the blocks' busy times
over the largest, measured in the sequential mode (what L workers could reach).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import al_ext
from al_ext import Pipeline
from al_ext.fused import FusedBlockAdam

from interleave import best_ratio, interleaved, median_ratio, median_time

BATCHES = 48
ROUNDS = 5
# (name, in_features, hidden widths, label width, classes, batch): equal-cost blocks (width
# 256, bridges 1280, inputs and one-hot labels as wide as the blocks, so that block 1's g
# and h cost what the others' do) for L = 2, 4, 8, and the NECO MNIST MLP.
CASES = [
    ("L2-equal", 256, (256,) * 2, 256, 256, 32),
    ("L4-equal", 256, (256,) * 4, 256, 256, 32),
    ("L4-equal", 256, (256,) * 4, 256, 256, 128),
    ("L8-equal", 256, (256,) * 8, 256, 256, 32),
    ("NECO-MLP", 784, (1024, 1024), 1024, 10, 32),
    ("NECO-MLP", 784, (1024, 1024), 1024, 10, 128),
]


def print_table(table: dict[tuple[str, int], dict[str, dict]], header: str) -> None:
    print(f"\n{header}")
    print("| model | batch | mode | samples/s | x sequential | x sequential, best times | stage idle fractions | "
          "ideal ratio |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for (name, batch), modes in table.items():
        for mode, r in modes.items():
            idle = " ".join(f"{v:.3f}" for v in r.get("idle", [])) or "-"
            ideal = f"{r['ideal']:.2f}" if "ideal" in r else "-"
            print(f"| {name} | {batch} | {mode} | {r['samples_per_s']:,.0f} | {r['x_sequential']:.2f} | "
                  f"{r['x_sequential_best']:.2f} | {idle} | {ideal} |")


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, int], dict[str, dict]] = {}
    yield table
    print_table(table, f"{BATCHES} batches per epoch, {torch.get_num_threads()} cores")


def setup(in_features, hidden, label_dim, classes, batch, batches, device="cpu"):
    torch.manual_seed(0)
    model = al_ext.ALMLP(in_features, classes, hidden=hidden, label_dim=label_dim, backend="fused").to(device)
    opts = [FusedBlockAdam(b, 1e-4, 2e-4) for b in model.blocks]
    x = torch.rand(batches * batch, in_features, device=device)
    y = torch.randint(0, classes, (batches * batch,), device=device)
    return model, opts, [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def epochs(model, opts, batches, pipelines: dict[str, Pipeline], runs: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """One epoch per mode: the Python loop, and each named Pipeline (its last run kept in ``runs``)."""
    prepared = [(x, model.label_targets(y)) for x, y in batches]

    def python():
        for s, t in prepared:
            for opt in opts:
                s, t, _, _ = opt.train_step(s, t, check_finite=False)

    def with_pipeline(name):
        def epoch():
            runs[name] = pipelines[name].run(batches)
        return epoch

    return {"python": python, **{name: with_pipeline(name) for name in pipelines}}


def summarise(times: dict[str, list[float]], runs: dict[str, Any], samples: int) -> dict[str, dict]:
    out = {}
    for mode, t in times.items():
        record = {"samples_per_s": samples / median_time(t), "x_sequential": median_ratio(times["sequential"], t),
                  "x_sequential_best": best_ratio(times["sequential"], t)}
        if mode == "sequential":
            busy = [b["busy_s"] for b in runs[mode].blocks]
            record["ideal"] = sum(busy) / max(busy)
        elif mode in runs:
            record["idle"] = [s["idle_fraction"] for s in runs[mode].stages]
        out[mode] = record
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[5]}")
def test_epoch(benchmark, results, case):
    name, in_features, hidden, label_dim, classes, batch = case
    model, opts, batches = setup(in_features, hidden, label_dim, classes, batch, BATCHES)
    pipelines = {"sequential": Pipeline(model, opts, pipelined=False),
                 "seq-1thread": Pipeline(model, opts, pipelined=False, threads_per_stage=1),
                 "pipeline": Pipeline(model, opts), "stages": Pipeline(model, opts, shared=False),
                 "per-block": Pipeline(model, opts, stages=len(hidden), shared=False)}
    runs: dict[str, Any] = {}
    benchmark.group = f"{name}, batch {batch}"
    times = interleaved(benchmark, epochs(model, opts, batches, pipelines, runs), ROUNDS)
    summary = summarise(times, runs, BATCHES * batch)
    benchmark.extra_info.update(summary, round_times_s=times)  # --benchmark-json keeps each round
    results[(name, batch)] = summary


BUBBLE_BATCHES = 500


def test_bubble_over_a_long_epoch(benchmark):
    """Issue 4's bubble bound (2 % of an epoch of 500 batches at L = 8) on the CPU: the
    pipeline alone, default stages. The bottleneck stage's idle fraction is the bubble
    (filling, draining, waiting at handoffs); the other stages' idle fractions add the
    imbalance of their blocks' costs."""
    model, opts, batches = setup(256, (256,) * 8, 256, 256, 32, BUBBLE_BATCHES)
    pipeline = Pipeline(model, opts)
    pipeline.run(batches[:48])  # measures the blocks' costs, which balance the stages of the timed run
    run = benchmark.pedantic(pipeline.run, args=(batches,), rounds=2, iterations=1)
    busiest = max(run.stages, key=lambda stage: 1.0 - stage["idle_fraction"])
    benchmark.extra_info.update(stage_idle=[s["idle_fraction"] for s in run.stages], bubble=busiest["idle_fraction"])
    idle = " ".join(f"{s['idle_fraction']:.4f}" for s in run.stages)
    print(f"\nL8-equal, batch 32, {BUBBLE_BATCHES} batches, {len(run.stages)} stages: "
          f"{BUBBLE_BATCHES * 32 / run.wall_s:,.0f} samples/s; stage idle fractions {idle}; "
          f"bubble (idle fraction of the busiest stage) {busiest['idle_fraction']:.2%}")
