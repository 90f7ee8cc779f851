"""Pipelined AL training on one GPU against the single-stream sequential run, in one run.

    python -m pytest benchmarks/test_bench_pipeline_cuda.py --benchmark-only --benchmark-columns=mean,rounds -s

The CUDA counterpart of test_bench_pipeline.py (skipped without a GPU). One epoch of 500
batches, every block trained with its fused step (FusedBlockAdam), in turn three ways:
- python:     the sequential loop in Python on the default stream (check_finite=False, so
              that it does not wait for the GPU after each block);
- sequential: the C++ scheduler's sequential mode, every step on one stream;
- pipeline:   one stage, so one stream and one host thread, per block; events at the handoffs;
- graphs:     the same, each block's step replayed from a CUDA graph (cuda_graphs=True): one
              launch per step instead of some thirty;
- seq-graphs: the sequential mode with graphs, to tell what graphs give from what streams give.
Blocks small enough to leave the GPU idle between launches are where streams pay: L = 8 blocks
of width 512 at batch 64 (the case issue 4 sets its targets on), and the NECO MLP for scale.
Each timed epoch ends with torch.cuda.synchronize(). The columns are those of the CPU file;
the stage idle fraction over the 500 batches is the bubble issue 4 bounds at 2 %.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import al_ext
from al_ext import Pipeline

from interleave import interleaved
from test_bench_pipeline import epochs, print_table, setup, summarise

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and al_ext._extension.has_cuda_kernels()),
                                reason="needs a CUDA device and an al_ext build with CUDA kernels")

BATCHES = 500
# (name, in_features, hidden widths, label width, classes, batch); as many classes as the
# label width makes block 1 cost what the others do.
CASES = [
    ("L8-width512", 512, (512,) * 8, 512, 512, 64),
    ("L2-width512", 512, (512,) * 2, 512, 512, 64),
    ("NECO-MLP", 784, (1024, 1024), 1024, 10, 32),
]


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, int], dict[str, dict]] = {}
    yield table
    print_table(table, f"{BATCHES} batches per epoch, {torch.cuda.get_device_name()}, torch {torch.__version__}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-batch{c[5]}")
def test_epoch_cuda(benchmark, results, case):
    name, in_features, hidden, label_dim, classes, batch = case
    model, opts, batches = setup(in_features, hidden, label_dim, classes, batch, BATCHES, device="cuda")
    pipelines = {"sequential": Pipeline(model, opts, pipelined=False), "pipeline": Pipeline(model, opts),
                 "graphs": Pipeline(model, opts, cuda_graphs=True),
                 "seq-graphs": Pipeline(model, opts, pipelined=False, cuda_graphs=True)}
    runs: dict[str, Any] = {}
    benchmark.group = f"{name}, batch {batch}, CUDA"
    times = interleaved(benchmark, epochs(model, opts, batches, pipelines, runs), rounds=3,
                        sync=torch.cuda.synchronize)
    summary = summarise(times, runs, BATCHES * batch)
    benchmark.extra_info.update(summary, round_times_s=times)
    results[(name, batch)] = summary
