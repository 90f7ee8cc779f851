"""The general path (any blocks, any torch optimiser) against the AL loop a PyTorch user
would write by hand, in one run, in float32 and in bf16.

    python -m pytest benchmarks/test_bench_general_path.py --benchmark-only -s

For each model of the zoo (at the sizes below, on random data of its input shape) and each
precision, six implementations take turns (benchmarks/interleave.py), from the same
weights, each timed over a stream of STREAM batches:
- handwritten: per block f and g on detached inputs, both losses in float32, one backward of
  their sum, per block an Adam(fused=True) over (f, b) and one over (g, h), zero_grad() with
  its default (set_to_none); bf16: the forward and losses under torch.autocast;
- compiled:    the same with its forward pass, losses and backward through torch.compile
  (the fused Adam, one kernel per parameter group already, stays eager);
- handwritten-reusing: the hand-written loop inside al_ext.large_buffers.reusing_large_buffers(),
  which the engines open around every run: freed large CPU buffers serve the next step instead
  of fresh pages (what a user gets with one line, or with jemalloc); set against the engine, it
  tells what the engine gains from that alone;
- engine:      al_ext's engine for the model, as the Trainer picks it (ALEngine: the
  reference's local losses, torch's fused Adam from the name "adam", the precision policy),
  batch after batch;
- engine-compiled: the same with Trainer(compile=True): every block's forward pass and
  losses in one torch.compile graph, the compiled loop's counterpart;
- pipelined:   the same with Trainer(pipeline=True): the blocks train at once in the C++
  scheduler, whose workers share the blocks (al_ext.Pipeline). It fills and drains once per
  stream, as it does once per epoch in training, so a stream this short understates it.
The summary gives each one's median time per batch and samples/s, and the compiled loop's,
the engine's and the pipeline's speed over the hand-written loop (median of per-round
ratios; target: at least 1.0, aim 1.1), the engine's over the reusing loop, the compiled
engine's over the compiled loop, and the pipeline's over the fastest of the three loops in
each round (the strongest a user would write).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import al_ext
from al_ext.engines import make_engine
from al_ext.large_buffers import reusing_large_buffers
from al_ext.optim import optimizer_factory
from al_ext.precision import make_precision

from interleave import best_ratio, interleaved, median_ratio, median_time

BATCH = 64
STREAM = 16
ROUNDS = 7
# name: (builder, input maker) at sizes that fit this 2-core machine.
MODELS = {
    "ALCNN": (lambda: al_ext.models.ALCNN((1, 28, 28), channels=((16, 16), (16, 16), (32, 32), (32, 32)),
                                          label_dim=128),
              lambda: torch.rand(BATCH, 784)),
    "VGG_AL": (lambda: al_ext.models.VGG_AL((3, 32, 32), stages=((16,), (32,), (64,)), label_dim=128),
               lambda: torch.rand(BATCH, 3 * 32 * 32)),
    "ResNet_AL(20)": (lambda: al_ext.models.ResNet_AL(20, (3, 32, 32), widths=(16, 32, 64), label_dim=128),
                      lambda: torch.rand(BATCH, 3 * 32 * 32)),
    "LSTM_AL": (lambda: al_ext.models.LSTM_AL(5000, 4, hidden=(128, 128), label_dim=128),
                lambda: torch.randint(0, 5000, (BATCH, 64))),
    "Transformer_AL": (lambda: al_ext.models.Transformer_AL(5000, 4, max_len=64, label_dim=128),
                       lambda: torch.randint(0, 5000, (BATCH, 64))),
}


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def handwritten(model: al_ext.AssociatedLearning, batches: Batches, bf16: bool, compiled: bool = False,
                reusing: bool = False):
    opts = []
    for fb, gh in model.parameter_groups():
        opts += [torch.optim.Adam(fb, lr=1e-4, fused=True), torch.optim.Adam(gh, lr=2e-4, fused=True)]

    def losses_backward(x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = F.one_hot(y, model.num_classes).float()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            s, t, total = x, t0, 0.0
            for i, block in enumerate(model.blocks):
                s_in, t_in = s.detach(), t.detach()
                s, t = block.f(s_in), block.g(t_in)
                total = total + F.mse_loss(block.b(s).float(), t.detach().float())
                decoded = block.h(t).float()
                total = total + (F.mse_loss(decoded, t_in.float()) if model.ae_loss_of(i) == "mse"
                                 else F.cross_entropy(decoded, t_in.float()))
        total.backward()

    forward_backward = torch.compile(losses_backward) if compiled else losses_backward

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        for opt in opts:
            opt.zero_grad()
        forward_backward(x, y)
        for opt in opts:
            opt.step()

    def run() -> None:
        with reusing_large_buffers() if reusing else contextlib.nullcontext():
            for x, y in batches:
                step(x, y)

    return run


def engine_run(model: al_ext.AssociatedLearning, batches: Batches, bf16: bool, pipeline: bool = False,
               compile: bool = False):
    precision = make_precision("bf16" if bf16 else "fp32", model, torch.device("cpu"))
    engine = make_engine(model, optimizer_factory("adam"), 1e-4, 2e-4, precision=precision, pipeline=pipeline,
                         compile=compile)
    return lambda: engine.run(batches, on_batch=lambda index, losses: False)


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, str], dict[str, float]] = {}
    yield table
    print("\n| model | precision | handwritten ms/batch | compiled x handwritten | engine x handwritten | "
          "engine x handwritten-reusing | engine-compiled x compiled | pipelined ms/batch | pipelined samples/s | "
          "pipelined x handwritten (best times) | pipelined x the fastest loop |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, precision), r in table.items():
        print(f"| {name} | {precision} | {r['handwritten_ms']:.1f} | {r['compiled_ratio']:.2f} | "
              f"{r['engine_ratio']:.2f} | {r['engine_vs_reusing']:.2f} | {r['engine_compiled_vs_compiled']:.2f} | "
              f"{r['pipelined_ms']:.1f} | {r['samples_per_s']:,.0f} | {r['pipelined_ratio']:.2f} "
              f"({r['pipelined_best']:.2f}) | {r['pipelined_vs_fastest']:.2f} |")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_general_path_against_the_handwritten_loop(benchmark, results, name, precision):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    models = [build() for _ in range(6)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    batches = [(inputs(), torch.randint(0, models[0].num_classes, (BATCH,))) for _ in range(STREAM)]
    bf16 = precision == "bf16"
    runs = {"handwritten": handwritten(models[0], batches, bf16),
            "compiled": handwritten(models[3], batches, bf16, compiled=True),
            "handwritten-reusing": handwritten(models[5], batches, bf16, reusing=True),
            "engine": engine_run(models[1], batches, bf16),
            "engine-compiled": engine_run(models[4], batches, bf16, compile=True),
            "pipelined": engine_run(models[2], batches, bf16, pipeline=True)}
    benchmark.group = f"{name}, {precision}, batch {BATCH}, {STREAM} batches"
    times = interleaved(benchmark, runs, ROUNDS)
    per_batch = {k: median_time(v) / STREAM for k, v in times.items()}
    results[(name, precision)] = {
        "handwritten_ms": per_batch["handwritten"] * 1e3,
        "pipelined_ms": per_batch["pipelined"] * 1e3, "samples_per_s": BATCH / per_batch["pipelined"],
        **{f"{k}_ratio": median_ratio(times["handwritten"], times[k]) for k in ("compiled", "engine", "pipelined")},
        "engine_vs_reusing": median_ratio(times["handwritten-reusing"], times["engine"]),
        "engine_compiled_vs_compiled": median_ratio(times["compiled"], times["engine-compiled"]),
        "pipelined_best": best_ratio(times["handwritten"], times["pipelined"]),
        "pipelined_vs_fastest": median_ratio([min(loops) for loops in zip(times["handwritten"], times["compiled"],
                                                                          times["handwritten-reusing"])],
                                             times["pipelined"]),
    }
