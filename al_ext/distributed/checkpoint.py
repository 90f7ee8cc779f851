"""Checkpoints of a distributed run.

Consolidated: rank 0 gathers every stage's blocks and optimiser states into the state one
process would have, so ``Trainer.save`` writes the same file as a single-process run, and
each side loads the other's. Sharded: torch.distributed.checkpoint, each stage writing its
own blocks (one replica per stage), loadable into any number of ranks and stages.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .transport import collective, failure_seen

if TYPE_CHECKING:
    from .engine import DistributedALEngine


def block_of(key: str) -> int | None:
    """The block (from 0) a model state key belongs to; None for keys outside the blocks."""
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def owns_key(engine: DistributedALEngine, key: str) -> bool:
    """Whether this rank holds the trained value of a model state entry (keys outside the
    blocks belong to the first stage)."""
    block = block_of(key)
    if block is None:
        return not engine.placed or engine.topology.is_first
    return engine.owns_block(block)


def owned_model_state(engine: DistributedALEngine, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if owns_key(engine, k)}


def _gather_to_first_rank(engine: DistributedALEngine, mine: Any) -> list[Any] | None:
    """Every stage's first replica's ``mine``, in stage order, on rank 0; None elsewhere."""
    top = engine.topology
    contribution = mine if top.replica == 0 else None
    gathered: list[Any] | None = [None] * top.world_size if top.rank == 0 else None
    try:
        dist.gather_object(contribution, gathered, dst=0)
    except Exception as exc:  # noqa: BLE001 - a peer that failed or died
        raise failure_seen(None, "the checkpoint's gathering on rank 0", exc) from None
    if gathered is None:
        return None
    return [gathered[top.rank_of(stage, 0)] for stage in range(top.stages)]


def full_model_state(engine: DistributedALEngine, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    parts = _gather_to_first_rank(engine, {k: v.cpu() for k, v in owned_model_state(engine, state).items()})
    if parts is None:
        return None
    merged = {k: v for part in parts for k, v in part.items()}
    return {k: merged[k] for k in state}  # the model's own key order


def full_engine_state(engine: DistributedALEngine, state: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's state_dict with each block's optimiser states from the rank that trains it."""
    owned = {j: state["optimizers"][j] for j in engine.owned_optimizers()}
    parts = _gather_to_first_rank(engine, _to_cpu(owned))
    if parts is None:
        return None
    merged = {j: s for part in parts for j, s in part.items()}
    return dict(state, optimizers=[merged[j] for j in range(len(engine.optimizers))])


def load_hyperparameters(opt: torch.optim.Optimizer, param_groups: list[dict[str, Any]]) -> None:
    """An optimiser's learning rates and other group settings, without its state (which
    another rank holds)."""
    if len(param_groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint's optimiser has {len(param_groups)} parameter groups, this one "
                         f"{len(opt.param_groups)}")
    for group, saved in zip(opt.param_groups, param_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})


def load_owned(engine: DistributedALEngine, model_state: dict[str, Tensor]) -> None:
    """Loads the entries of this rank's blocks from a whole model's state."""
    missing = [k for k in engine.model.state_dict() if owns_key(engine, k) and k not in model_state]
    if missing:
        raise ValueError(f"the state lacks {len(missing)} entries of this rank's blocks, such as {missing[0]!r}")
    engine.model.load_state_dict(owned_model_state(engine, model_state), strict=False)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# ---- sharded (torch.distributed.checkpoint) ---------------------------------------------

RUN_STATE_FILE = "run_state.pt"


def _optimizer_tensors(engine: DistributedALEngine) -> dict[str, Tensor]:
    """This rank's optimiser states under names that do not depend on the layout of ranks:
    optimiser j's ``key`` of its parameter p is ``optim.j.p.key``."""
    out: dict[str, Tensor] = {}
    for j in engine.owned_optimizers():
        for p, entries in engine.optimizers[j].state_dict()["state"].items():
            for key, value in entries.items():
                if not isinstance(value, Tensor):
                    raise TypeError(f"optimiser {j}'s state {key!r} is a {type(value).__name__}; a sharded "
                                    "checkpoint holds tensors (save to one file instead)")
                out[f"optim.{j}.{p}.{key}"] = value
    return out


def save_sharded(engine: DistributedALEngine, directory: str, run_state: dict[str, Any]) -> None:
    """Writes the run into ``directory``: through torch.distributed.checkpoint each stage's
    first replica its own blocks and optimiser states; rank 0 the rest (``run_state``, the
    schedulers, every optimiser's param groups, which every rank keeps alike) in one file."""
    import torch.distributed.checkpoint as dcp  # a second of imports, only where asked for
    top = engine.topology
    tensors: dict[str, Tensor] = {}
    if top.replica == 0:
        tensors.update({f"model.{k}": v for k, v in owned_model_state(engine, engine.model.state_dict()).items()})
        tensors.update(_optimizer_tensors(engine))
    dcp.save(tensors, checkpoint_id=directory)
    if top.rank == 0:
        state = engine.state_dict()
        rest = {"schedulers": state["schedulers"], "precision": state["precision"],
                "optimizer_kinds": state["optimizer_kinds"],
                "param_groups": [s["param_groups"] for s in state["optimizers"]]}
        torch.save({**run_state, "engine": rest}, f"{directory}/{RUN_STATE_FILE}")
    # The directory is whole when save returns, on any rank.
    collective(partial(dist.barrier, async_op=True), "the other ranks' shards")


def read_run_state(directory: str) -> dict[str, Any]:
    """What rank 0 wrote beside the shards: the run's place, history and the like."""
    path = Path(directory) / RUN_STATE_FILE
    if not path.is_file():
        raise ValueError(f"{directory} holds no {RUN_STATE_FILE}: it is not a sharded al_ext checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sharded(engine: DistributedALEngine, directory: str) -> None:
    """Loads this rank's blocks and optimiser states, every optimiser's hyperparameters, the
    schedulers and the precision from a sharded checkpoint written by any number of ranks."""
    import torch.distributed.checkpoint as dcp
    rest = read_run_state(directory)["engine"]
    engine.check_state_matches({**rest, "optimizers": rest["param_groups"]})  # one entry per optimiser
    model_state = owned_model_state(engine, engine.model.state_dict())
    wanted: dict[str, Any] = {f"model.{k}": v for k, v in model_state.items()}
    owned = set(engine.owned_optimizers())
    # Optimiser states exist only after a first step: their tensors are made from the metadata.
    metadata = dcp.FileSystemReader(directory).read_metadata()
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("optim.") and int(key.split(".")[1]) in owned:
            wanted[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(wanted, checkpoint_id=directory)
    engine.model.load_state_dict({k.removeprefix("model."): v for k, v in wanted.items() if k.startswith("model.")},
                                 strict=False)
    for j, opt in enumerate(engine.optimizers):
        if j not in owned:
            load_hyperparameters(opt, rest["param_groups"][j])
            continue
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in wanted.items():
            kind, index, *where = key.split(".")
            if kind == "optim" and int(index) == j:
                state.setdefault(int(where[0]), {})[".".join(where[1:])] = value
        opt.load_state_dict({"state": state, "param_groups": rest["param_groups"][j]})
    for scheduler, s in zip(engine.schedulers, rest["schedulers"]):
        scheduler.load_state_dict(s)
    engine.precision.load_state_dict(rest["precision"])
