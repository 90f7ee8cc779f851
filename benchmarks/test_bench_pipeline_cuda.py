"""Pipelined AL training on one GPU against the single-stream sequential run, in one run.

    python -m pytest benchmarks/test_bench_pipeline_cuda.py --benchmark-only --benchmark-columns=mean,rounds -s

The CUDA counterpart of test_bench_pipeline.py (skipped without a GPU). One epoch of 500
batches, every block trained with its fused step (FusedBlockAdam), three ways:
- python:     the sequential loop in Python on the default stream (check_finite=False, so
              that it does not wait for the GPU after each block);
- sequential: the C++ scheduler's sequential mode, every step on the caller's stream;
- pipeline:   one stage, so one stream and one host thread, per block; events at the handoffs.
Blocks small enough to leave the GPU idle between launches are where streams pay: L = 8 blocks
of width 512 at batch 64 (the case issue 4 sets its targets on), and the NECO MLP for scale.
Each timed epoch ends with torch.cuda.synchronize(). The summary (shown with -s) gives
samples/s, the ratio to the sequential mode, each stage's idle (bubble) fraction over the
epoch, and the ideal ratio (the blocks' summed busy time over the largest, sequential mode).
"""
from __future__ import annotations

import pytest
import torch

import al_ext
from al_ext import Pipeline
from al_ext.fused import FusedBlockAdam

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and al_ext._extension.has_cuda_kernels()),
                                reason="needs a CUDA device and an al_ext build with CUDA kernels")

BATCHES = 500
# (name, in_features, hidden widths, label width, batch)
CASES = [
    ("L8-width512", 512, (512,) * 8, 512, 64),
    ("L2-width512", 512, (512,) * 2, 512, 64),
    ("NECO-MLP", 784, (1024, 1024), 1024, 32),
]


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, int], dict[str, dict]] = {}
    yield table
    print(f"\n{BATCHES} batches per epoch, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | batch | mode | samples/s | x sequential | stage idle fractions | ideal ratio |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: |")
    for (name, batch), modes in table.items():
        seq = modes.get("sequential", {}).get("samples_per_s")
        for mode, r in modes.items():
            ratio = f"{r['samples_per_s'] / seq:.2f}" if seq else "-"
            idle = " ".join(f"{v:.3f}" for v in r.get("idle", [])) or "-"
            ideal = f"{r['ideal']:.2f}" if "ideal" in r else "-"
            print(f"| {name} | {batch} | {mode} | {r['samples_per_s']:,.0f} | {ratio} | {idle} | {ideal} |")


def setup(in_features, hidden, label_dim, batch):
    torch.manual_seed(0)
    model = al_ext.ALMLP(in_features, 10, hidden=hidden, label_dim=label_dim, backend="fused").cuda()
    opts = [FusedBlockAdam(b, 1e-4, 2e-4) for b in model.blocks]
    x = torch.rand(BATCHES * batch, in_features, device="cuda")
    y = torch.randint(0, 10, (BATCHES * batch,), device="cuda")
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]
    return model, opts, batches


@pytest.mark.parametrize("mode", ["python", "sequential", "pipeline"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[4]}")
def test_epoch_cuda(benchmark, results, case, mode):
    name, in_features, hidden, label_dim, batch = case
    model, opts, batches = setup(in_features, hidden, label_dim, batch)
    stats = {}
    if mode == "python":
        prepared = [(x, model.label_targets(y)) for x, y in batches]

        def epoch():
            for s, t in prepared:
                for opt in opts:
                    s, t, _, _ = opt.train_step(s, t, check_finite=False)
            torch.cuda.synchronize()
    else:
        pipeline = Pipeline(model, opts, pipelined=mode == "pipeline")

        def epoch():
            stats["run"] = pipeline.run(batches)
            torch.cuda.synchronize()
    epoch()  # warm-up
    benchmark.group = f"{name}, batch {batch}, CUDA"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    record = {"samples_per_s": BATCHES * batch / benchmark.stats.stats.min}
    if "run" in stats:
        run = stats["run"]
        if mode == "sequential":
            busy = [b["busy_s"] for b in run.blocks]
            record["ideal"] = sum(busy) / max(busy)
        else:
            record["idle"] = [s["idle_fraction"] for s in run.stages]
    benchmark.extra_info.update(record)
    results.setdefault((name, batch), {})[mode] = record
