"""One rank of a distributed run that tests/test_distributed.py starts (2-4 of these), and
the single-process run it is compared with: the same model, data, seed and settings, built
by the functions below.

``run_rank`` is a rank forked by the tests (its output in OUT_DIR/log<r>.txt);
``python distributed_worker.py OUT_DIR JSON_OPTIONS`` runs one under a launcher that set
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank writes OUT_DIR/rank<r>.pt with its
history, evaluation and predictions; rank 0 writes what ``save`` names."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import al_ext
from al_ext.distributed import DistributedConfig

DEFAULTS: dict[str, Any] = dict(stages=2, replicas=None, backend="auto", optimizer="adam", epochs=2, batch_size=32,
                                samples=150, blocks=4, precision="fp32", schedule=None, save=None, load=None,
                                fail=None, max_in_flight=None, timeout_s=60.0, sharded_save=None, mismatch=False,
                                checkpoint_every=None, cnn=False, stop_at=None, seed_per_rank=False,
                                rank_stages=1, eval_differs=False, predict_differs=False, val_on_rank0_only=False,
                                checkpoint_folder=None)


def data(options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(options["samples"], 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes a model can learn
    return (x.reshape(-1, 1, 3, 4) if options["cnn"] else x), y


def model(options: dict[str, Any]) -> al_ext.AssociatedLearning:
    torch.manual_seed(0)
    if options["cnn"]:  # conv blocks: 4-D activations between stages, the autograd path
        return al_ext.models.ALCNN((1, 3, 4), 3, channels=((4, 4),) * options["blocks"],
                                   strides=(1,) * options["blocks"], label_dim=8, bridge_factor=2)
    hidden, activation = [16] * options["blocks"], "elu"
    if options["mismatch"] and os.environ.get("RANK") == "1":  # a bug: this rank builds another model
        if options["mismatch"] == "activation":
            activation = "tanh"  # of the same shapes
        else:
            hidden[-1] = 20
    return al_ext.ALMLP(12, 3, hidden=hidden, label_dim=8, bridge_factor=2, backend=options["backend"],
                        activation=activation)


def trainer(options: dict[str, Any], distributed: DistributedConfig | None) -> al_ext.Trainer:
    scheduler = ((lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
                 if options["schedule"] == "step" else None)
    seed = int(os.environ.get("RANK", 0)) if options["seed_per_rank"] else 0  # a bug: replicas read other batches
    return al_ext.Trainer(model(options), lr=3e-3, batch_size=options["batch_size"], seed=seed, progress=False,
                          optimizer=options["optimizer"], precision=options["precision"], scheduler=scheduler,
                          distributed=distributed)


class StopAt(al_ext.callbacks.Callback):
    """Asks the run to stop, on one rank only, after one step."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step(self, trainer: al_ext.Trainer, record: dict[str, Any]) -> None:
        if torch.distributed.get_rank() == self.rank and record["step"] == self.step:
            trainer.should_stop = True


class FailAt(al_ext.callbacks.Callback):
    """On one rank at one step: raises, as a bug in a user's callback would, or (``how`` =
    "die") kills its own process, as the out-of-memory killer would."""

    def __init__(self, rank: int, step: int, how: str = "raise") -> None:
        self.rank, self.step, self.how = rank, step, how

    def on_step(self, trainer: al_ext.Trainer, record: dict[str, Any]) -> None:
        if torch.distributed.get_rank() == self.rank and record["step"] == self.step:
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {self.step}")


def main(out: Path, options: dict[str, Any]) -> None:
    options = {**DEFAULTS, **options}
    torch.set_num_threads(1)
    config = DistributedConfig(pipeline_stages=options["stages"], data_parallel=options["replicas"],
                               max_in_flight=options["max_in_flight"], timeout_s=options["timeout_s"],
                               rank_stages=options["rank_stages"])
    t = trainer(options, config)
    if options["fail"] is not None:
        t.callbacks.append(FailAt(*options["fail"]))
    if options["stop_at"] is not None:
        t.callbacks.append(StopAt(*options["stop_at"]))
    if options["load"] is not None:
        t.load(options["load"])  # a file or a sharded checkpoint's directory
    x, y = data(options)
    every = options["checkpoint_every"]
    # val_on_rank0_only, a bug: the other ranks never join rank 0's evaluations
    val = None if options["val_on_rank0_only"] and torch.distributed.get_rank() != 0 else (x, y)
    folder = out if options["checkpoint_folder"] is None else Path(options["checkpoint_folder"])
    history = t.fit((x, y), val, epochs=options["epochs"], checkpoint=None if every is None else folder / "running.pt",
                    checkpoint_every=every)
    if options["save"] is not None:
        t.save(options["save"])
    if options["sharded_save"] is not None:
        t.save(options["sharded_save"], sharded=True)
    rank = torch.distributed.get_rank()
    if options["eval_differs"]:  # a bug: each replica evaluates a shard of its own (a DistributedSampler)
        replica = t.engine.topology.replica
        t.evaluate((x[replica::2], y[replica::2]))
    if options["predict_differs"]:  # a bug: the ranks predict different rows (as many on each)
        t.engine.predict(x[rank : 37 + rank])
    result = {"history": history, "position": (t.epoch, t.position), "evaluation": t.evaluate((x, y)), "predict": t.engine.predict(x[:37]),
              "predict_depth1": t.engine.predict(x[:37], depth=1),
              "adaptive": t.engine.predict_adaptive(x[:37], 0.6), "blocks": list(t.engine.topology.blocks),
              "block_costs": t.engine.block_costs, "in_scheduler": t.engine.in_scheduler()}
    torch.save(result, out / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.destroy_process_group()


def run_rank(rank: int, world: int, port: int, out: str, options: dict[str, Any]) -> None:
    """A rank as the tests start it, in a process forked from a server that has torch
    imported already (seconds per process saved): the launcher's variables, the output to
    a log file, then ``main``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    log = os.open(os.path.join(out, f"log{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    main(Path(out), options)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
