"""What an AL step that keeps float32 master weights and Adam state costs at least when its
parts run one after another: the step's GEMMs alone (in bf16 or float32, through torch.mm, or
oneDNN for float32) plus one separate float32 Adam update of every parameter (torch's fused
Adam, memory-bound). A step that hides the update behind its GEMMs can beat the sum; at the
GEMMs' rate it cannot beat the GEMMs alone.

    python benchmarks/step_floor.py [--batch 32 128] [--width 1024]
"""
from __future__ import annotations

import argparse
import time

import torch

import al_ext
from interleave import median_time
from test_bench_block import gemms_of_step


def median_ms(fn, rounds: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median_time(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    model = al_ext.ALMLP(784, 10, hidden=(args.width, args.width), label_dim=args.width)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    adam = median_ms(torch.optim.Adam(params, lr=1e-4, fused=True).step)
    print(f"NECO MLP at width {args.width}: {sum(p.numel() for p in params) / 1e6:.1f} M parameters; "
          f"float32 Adam update {adam:.1f} ms")
    for batch in args.batch:
        for dtype in (torch.bfloat16, torch.float32):
            gemms = median_ms(gemms_of_step(batch, args.width, "cpu", dtype))
            print(f"batch {batch}, {str(dtype).removeprefix('torch.')} GEMMs {gemms:.1f} ms; with the update after them "
                  f"{gemms + adam:.1f} ms")


if __name__ == "__main__":
    main()
