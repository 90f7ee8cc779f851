"""What keeping large CPU buffers (al_ext.large_buffers) saves: the engine's step on the NECO
ALCNN (MNIST shape), with reuse on (the engines' default) and off (max_kept_bytes 0), taking
turns, on the main thread and on a worker thread (where glibc's 64 MiB heaps return even
buffers under its mmap threshold to the kernel), with the minor page faults of each step.

    python benchmarks/large_buffers_probe.py [--width-ratio 0.5] [--precision fp32 bf16] [--threads 1]
"""
from __future__ import annotations

import argparse
import resource
import threading
import time

import torch

import al_ext
from al_ext import large_buffers
from al_ext.engines import make_engine
from interleave import median_time

BATCH = 64


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def timed_steps(engine, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """(median ms a step, minor page faults a step) of ``steps`` batches after two warm-up
    ones, in one engine.run, as the Trainer trains an epoch (engine.step opens no block)."""
    times: list[float] = []
    marks = [time.perf_counter(), faults(), 0]

    def on_batch(index: int, *_) -> None:
        now = time.perf_counter()
        if index == 1:
            marks[1] = faults()
        elif index > 1:
            times.append(now - marks[0])
        marks[0] = now

    engine.run([(x, y)] * (steps + 2), on_batch)
    return median_time(times) * 1e3, (faults() - marks[1]) / steps


def on_worker_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width-ratio", type=float, default=0.5, help="of the NECO ALCNN's channels and label width")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    neco = al_ext.presets.PRESETS["ALCNN"]["neco"]()
    channels = [tuple(max(1, round(c * args.width_ratio)) for c in pair) for pair in neco["channels"]]
    label_dim = max(1, round(neco["label_dim"] * args.width_ratio))
    x, y = torch.rand(BATCH, 784), torch.randint(10, (BATCH,))
    print(f"NECO ALCNN x {args.width_ratio}: channels {channels}, label {label_dim}; batch {BATCH}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| precision | thread | reuse | ms a step (median of rounds) | minor page faults a step |")
    print("| --- | --- | --- | ---: | ---: |")
    default_limit = large_buffers.stats()["max_kept_bytes"]
    for precision in args.precision:
        torch.manual_seed(0)
        model = al_ext.models.ALCNN((1, 28, 28), 10, channels=channels, label_dim=label_dim)
        engine = make_engine(model, "adam", 1e-4, precision=precision)
        for thread in ("main", "worker"):
            results: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
            for _ in range(args.rounds):
                for reuse in ("on", "off"):
                    large_buffers.set_max_kept_bytes(default_limit if reuse == "on" else 0)
                    run = lambda: timed_steps(engine, x, y, args.steps)  # noqa: E731
                    results[reuse].append(run() if thread == "main" else on_worker_thread(run))
            large_buffers.set_max_kept_bytes(default_limit)
            for reuse, measured in results.items():
                ms = median_time([m for m, _ in measured])
                page_faults = median_time([f for _, f in measured])
                print(f"| {precision} | {thread} | {reuse} | {ms:.1f} | {page_faults:,.0f} |")


if __name__ == "__main__":
    main()
