"""The general path (any blocks, any torch optimiser) against the AL loop a PyTorch user
would write by hand, in one run, in float32 and in bf16.

    python -m pytest benchmarks/test_bench_general_path.py --benchmark-only -s

For each model of the zoo (at the sizes below, on random data of its input shape) and each
precision, two implementations take turns (benchmarks/interleave.py), from the same weights:
- handwritten: per block f and g on detached inputs, both losses in float32, one backward of
  their sum, per block an Adam(fused=True) over (f, b) and one over (g, h), zero_grad() with
  its default (set_to_none); bf16: the forward and losses under torch.autocast;
- engine:      al_ext's engine for the model, as the Trainer picks it (ALEngine: the
  reference's local losses, torch's fused Adam from the name "adam", the precision policy).
The summary gives each one's median step time and samples/s, and the engine's speed over
the hand-written loop (median of per-round ratios; target: at least 1.0, aim 1.1).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import al_ext
from al_ext.engines import make_engine
from al_ext.optim import optimizer_factory
from al_ext.precision import make_precision

from interleave import best_ratio, interleaved, median_ratio, median_time

BATCH = 64
ROUNDS = 9
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


def handwritten(model: al_ext.AssociatedLearning, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    opts = []
    for fb, gh in model.parameter_groups():
        opts += [torch.optim.Adam(fb, lr=1e-4, fused=True), torch.optim.Adam(gh, lr=2e-4, fused=True)]
    t0 = F.one_hot(y, model.num_classes).float()

    def step():
        for opt in opts:
            opt.zero_grad()
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
        for opt in opts:
            opt.step()

    return step


def engine_step(model: al_ext.AssociatedLearning, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    precision = make_precision("bf16" if bf16 else "fp32", model, torch.device("cpu"))
    engine = make_engine(model, optimizer_factory("adam"), 1e-4, 2e-4, precision=precision)
    return lambda: engine.step(x, y)


@pytest.fixture(scope="session")
def results():
    table: dict[tuple[str, str], dict[str, float]] = {}
    yield table
    print("\n| model | precision | handwritten ms | engine ms | engine samples/s | engine x handwritten | best times |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, precision), r in table.items():
        print(f"| {name} | {precision} | {r['handwritten_ms']:.1f} | {r['engine_ms']:.1f} | {r['samples_per_s']:,.0f} | "
              f"{r['ratio']:.2f} | {r['best_ratio']:.2f} |")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_general_path_against_the_handwritten_loop(benchmark, results, name, precision):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    models = [build(), build()]
    models[1].load_state_dict(models[0].state_dict())
    x, y = inputs(), torch.randint(0, models[0].num_classes, (BATCH,))
    bf16 = precision == "bf16"
    steps = {"handwritten": handwritten(models[0], x, y, bf16), "engine": engine_step(models[1], x, y, bf16)}
    benchmark.group = f"{name}, {precision}, batch {BATCH}"
    times = interleaved(benchmark, steps, ROUNDS)
    seconds = median_time(times["engine"])
    results[(name, precision)] = {
        "handwritten_ms": median_time(times["handwritten"]) * 1e3, "engine_ms": seconds * 1e3,
        "samples_per_s": BATCH / seconds, "ratio": median_ratio(times["handwritten"], times["engine"]),
        "best_ratio": best_ratio(times["handwritten"], times["engine"]),
    }
