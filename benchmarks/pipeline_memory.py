"""Peak memory of a pipelined epoch against its length: the pipeline pulls batches from the
stream only as it trains them, so the peak should not grow with the number of batches.

    python benchmarks/pipeline_memory.py [--batches 100 2000] [--batch-size 64]

Each length runs in a fresh process (ru_maxrss is a process's lifetime peak): an ALMLP
with two blocks of width 256 (label width 256, bridges 1280) on 784 inputs trains one
pipelined epoch, through Trainer-free al_ext.Pipeline.run, of batches that a generator makes
one at a time (random 64 x 784 inputs, which the generator does not keep). Prints, per
length, the peak resident set size and the peak over that of the shortest stream, in MB and
in batches' worth of inputs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(batches: int, batch_size: int) -> dict[str, float]:
    import torch

    import al_ext

    torch.manual_seed(0)
    model = al_ext.ALMLP(784, 10, hidden=(256, 256), label_dim=256, bridge_factor=5)
    optimizers = al_ext.Trainer(model, progress=False).optimizers
    pipeline = al_ext.Pipeline(model, optimizers)

    def stream():
        gen = torch.Generator().manual_seed(1)
        for _ in range(batches):
            yield torch.rand(batch_size, 784, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)

    run = pipeline.run(stream())
    assert len(run.losses) == batches
    return {"batches": batches, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": run.wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.batches[0], args.batch_size)))
        return
    rows = []
    for n in args.batches:
        out = subprocess.run([sys.executable, __file__, "--child", "--batches", str(n), "--batch-size",
                              str(args.batch_size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    batch_mb = args.batch_size * 784 * 4 / 2**20
    print(f"{'batches':>8} {'peak RSS MB':>12} {'over shortest MB':>17} {'= batches of inputs':>20} {'wall s':>8}")
    for r in rows:
        extra = r["peak_rss_mb"] - base
        print(f"{r['batches']:>8} {r['peak_rss_mb']:>12.1f} {extra:>17.1f} {extra / batch_mb:>20.1f} {r['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
