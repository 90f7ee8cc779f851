"""Distributed AL against one process, on this machine's cores, in one sitting:

    python benchmarks/distributed_pipeline.py [--blocks 4] [--width 1024] [--batch-size 64] [--batches 32] [--rounds 3]

The NECO MLP with ``--blocks`` blocks of ``--width`` (label width = width, bridges 5x),
fused blocks and Adam, on random 784-feature inputs made ahead (``--batches`` batches, one
epoch, after one warm-up epoch). Configurations, each in a fresh process:

- one process, sequential, 1 thread and all threads (al_ext.Trainer);
- one process, pipelined in threads (Trainer(pipeline=True)): the strongest single-process
  alternative;
- torchrun with two processes of one thread each: two pipeline stages, and two data-parallel
  replicas (the global batch split in two).

Every configuration runs once a round; prints the best samples/s of the timed epoch (the
Trainer's own train_time_s), and the median over rounds of the ratio to the sequential run
with all threads. With two pipeline stages the parameters must equal the sequential ones
(one thread) bit for bit (checked every round).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def child(options: dict, mode: str, out: Path) -> None:
    import torch

    import al_ext
    from al_ext.distributed import DistributedConfig

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    torch.manual_seed(0)
    width = options["width"]
    model = al_ext.ALMLP(784, 10, hidden=(width,) * options["blocks"], label_dim=width, bridge_factor=5)
    gen = torch.Generator().manual_seed(1)
    n = options["batches"] * options["batch_size"]
    x, y = torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    distributed = {"stages": DistributedConfig(pipeline_stages=2), "replicas": DistributedConfig(data_parallel=2)}
    trainer = al_ext.Trainer(model, batch_size=options["batch_size"], progress=False, pipeline=mode == "pipelined",
                             distributed=distributed.get(mode))
    history = trainer.fit((x, y), epochs=2)
    trainer.save(out / f"{mode}.pt")
    if int(os.environ.get("RANK", "0")) == 0:
        (out / f"{mode}.json").write_text(json.dumps({"samples_per_s": history[-1]["samples_per_s"],
                                                       "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    base = {"blocks": args.blocks, "width": args.width, "batch_size": args.batch_size, "batches": args.batches}
    out = Path(tempfile.mkdtemp())
    runs = [("sequential", "sequential, 1 thread", 1, 1), ("sequential", f"sequential, {cores} threads", cores, 1),
            ("pipelined", f"pipelined in threads ({cores} threads)", cores, 1),
            ("stages", "torchrun: 2 stages x 1 thread", 1, 2), ("replicas", "torchrun: 2 replicas x 1 thread", 1, 2)]
    rates: dict[str, list[float]] = {label: [] for _, label, _, _ in runs}
    exact = True
    for _ in range(args.rounds):  # every configuration once a round: this machine drifts within minutes
        for mode, label, threads, procs in runs:
            rates[label].append(_run(out, base, mode, threads, procs))
        exact = exact and _two_stages_equal_sequential(out)
    reference = f"sequential, {cores} threads"
    print(f"NECO MLP, {args.blocks} blocks of {args.width}, batch {args.batch_size}, {args.batches} batches, "
          f"{cores} cores, {args.rounds} rounds")
    print(f"  {'':<40} {'best samples/s':>15} {'median ratio':>13} {'ratio of bests':>15}")
    for label, values in rates.items():
        ratios = sorted(v / r for v, r in zip(values, rates[reference]))
        print(f"  {label:<40} {max(values):>15,.0f} {ratios[len(ratios) // 2]:>12.2f}x "
              f"{max(values) / max(rates[reference]):>14.2f}x")
    print(f"  2 stages == sequential (1 thread each), bit for bit, every round: {exact}")


def _run(out: Path, base: dict, mode: str, threads: int, procs: int) -> float:
    options = json.dumps({**base, "threads": threads})
    code = (f"import json, pathlib, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import distributed_pipeline as b; b.child(json.loads({options!r}), {mode!r}, pathlib.Path({str(out)!r}))")
    command = [sys.executable, "-c", code] if procs == 1 else [
        shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc-per-node={procs}", "--no-python",
        sys.executable, "-c", code]
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True)
    if mode == "sequential":
        os.replace(out / "sequential.pt", out / f"sequential-{threads}.pt")
    return json.loads((out / f"{mode}.json").read_text())["samples_per_s"]


def _two_stages_equal_sequential(out: Path) -> bool:
    import torch
    one = torch.load(out / "sequential-1.pt", weights_only=True)["model"]
    staged = torch.load(out / "stages.pt", weights_only=True)["model"]
    return all(torch.equal(one[k], staged[k]) for k in one)


if __name__ == "__main__":
    main()
