"""Timing that survives a noisy machine: the implementations compared take turns.

This 2-core machine's speed drifts by 10-40 % within minutes, so timing one implementation
for a while, then the next, compares different machines. Here every round runs each
implementation once, back to back; the ratio of two implementations is taken within each
round, and the median over rounds is reported. Beside it, the ratio of the best times: on
this virtual machine, code whose threads meet at barriers (two OpenMP threads on every
GEMM) at times runs 2x slower while single-threaded code does not (a descheduled virtual
core stalls the barrier), and the best times are the ones such stalls did not touch.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(benchmark, fns: dict[str, Callable[[], None]], rounds: int,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Runs each of ``fns`` once per round, in turn, for ``rounds`` rounds (one round of all
    is one pytest-benchmark round), after one warm-up call each. ``sync`` is called after
    each call, inside its timing (torch.cuda.synchronize on a GPU). Returns each one's times."""
    for fn in fns.values():
        fn()
        if sync is not None:
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}

    def one_round() -> None:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return times


def median_time(times: list[float]) -> float:
    return statistics.median(times)


def median_ratio(reference: list[float], other: list[float]) -> float:
    """How many times faster ``other`` is than ``reference``: the median of the per-round ratios."""
    return statistics.median(r / o for r, o in zip(reference, other))


def best_ratio(reference: list[float], other: list[float]) -> float:
    """How many times faster ``other`` is than ``reference``, best time against best time."""
    return min(reference) / min(other)
