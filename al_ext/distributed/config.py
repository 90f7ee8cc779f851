"""Where a rank sits: the user's DistributedConfig, checked against the launch, and the
Topology it gives (which blocks this rank trains, its neighbours, its process groups)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._extension import _C
from ..validation import check_positive_int

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedConfig:
    """How a run is spread over the processes that torchrun (or any launcher that sets RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT) started: ``pipeline_stages`` (P) ranks each
    own a contiguous range of blocks, and ``data_parallel`` (R) replicas of that pipeline
    each train on their share of every batch. P x R must equal the world size;
    ``data_parallel=None`` takes world size / P.

    ``max_in_flight``: the batches the first stage may have started whose losses it has not
    yet heard back (None: 2 P), which bounds the activations held across ranks.
    ``rank_stages``: with one replica on the CPU, a rank that trains several blocks runs
    them as a pipeline of this many threads in al_ext's scheduler (None: one per intra-op
    thread of the rank, at most one per block; 1: one after another).
    ``timeout_s``: how long any rank waits for another (sends, receives, all-reduces)
    before the run fails, naming the rank it waited for: the bound on a hang when a rank
    stops without saying why. (Where the caller started the default process group itself,
    its own timeout holds for the messages between stages.)"""

    pipeline_stages: int = 1
    data_parallel: int | None = None
    max_in_flight: int | None = None
    rank_stages: int | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check_positive_int(self.pipeline_stages, "pipeline_stages")
        if self.data_parallel is not None:
            check_positive_int(self.data_parallel, "data_parallel")
        if self.max_in_flight is not None:
            check_positive_int(self.max_in_flight, "max_in_flight")
        if self.rank_stages is not None:
            check_positive_int(self.rank_stages, "rank_stages")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not 0 < self.timeout_s < 10**7):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class Topology:
    """Rank r is replica r % R of stage r // R: the ranks of one stage are adjacent (one
    all-reduce group each), and replica k's pipeline is ranks k, R + k, 2R + k, ..."""

    rank: int
    world_size: int
    stages: int  # P
    replicas: int  # R
    block_starts: tuple[int, ...]  # first block of each stage
    depth: int

    @property
    def stage(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return stage * self.replicas + (self.replica if replica is None else replica)

    def blocks_of(self, stage: int) -> range:
        ends = (*self.block_starts[1:], self.depth)
        return range(self.block_starts[stage], ends[stage])

    @property
    def blocks(self) -> range:
        """The blocks (from 0) this rank trains."""
        return self.blocks_of(self.stage)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, k) for k in range(self.replicas)]

    def describe(self) -> str:
        first, end = self.blocks.start + 1, self.blocks.stop
        return (f"rank {self.rank} (stage {self.stage + 1}/{self.stages}, replica {self.replica + 1}/{self.replicas}, "
                f"blocks {first}-{end})")


def launched() -> bool:
    """Whether this process was started by torchrun or a launcher like it."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(config: DistributedConfig, device: torch.device) -> bool:
    """Joins the job's default process group (Gloo on the CPU, NCCL on CUDA) unless the
    caller already did; True if this call made it (and so should end it)."""
    if dist.is_initialized():
        return False
    if not launched():
        missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
        raise ValueError(f"distributed= needs a launcher such as torchrun: the environment lacks {', '.join(missing)} "
                         "(run with torchrun --nproc-per-node N ..., or call torch.distributed.init_process_group "
                         "yourself first)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=config.timeout_s))
    return True


def make_topology(config: DistributedConfig, block_costs: list[float]) -> Topology:
    """The topology of this rank in the job that it joined."""
    return plan_topology(config, dist.get_world_size(), dist.get_rank(), block_costs)


def plan_topology(config: DistributedConfig, world_size: int, rank: int, block_costs: list[float]) -> Topology:
    """Rank ``rank``'s place in a job of ``world_size`` ranks; ValueError, saying what to
    change, for a configuration that cannot run: a world size that is not P x R, or more
    stages than blocks. The stages are balanced by ``block_costs`` (parameter counts, where
    the bridges dominate)."""
    stages = config.pipeline_stages
    replicas = config.data_parallel if config.data_parallel is not None else world_size // stages
    if replicas == 0 or stages * replicas != world_size:
        if config.data_parallel is not None:
            asked, launch = f"{stages} x {config.data_parallel}", f"{stages * config.data_parallel} processes"
        else:
            asked, launch = f"{stages} stages", f"a multiple of {stages} processes"
        raise ValueError(f"pipeline_stages x data_parallel must equal the world size {world_size}, got {asked}: launch "
                         f"{launch}, or change pipeline_stages or data_parallel")
    depth = len(block_costs)
    if stages > depth:
        raise ValueError(f"pipeline_stages={stages} is more than the model's {depth} blocks: every stage needs at "
                         f"least one block (use at most {depth} stages)")
    starts = tuple(_C.balanced_groups(block_costs, stages))
    if len(starts) != stages:
        raise ValueError(f"the blocks could not be split into {stages} stages (got {len(starts)})")
    return Topology(rank, world_size, stages, replicas, starts, depth)
