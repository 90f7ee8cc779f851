"""Distributed AL (al_ext.distributed) on the CPU with Gloo: 2 to 4 processes started here
(tests/distributed_worker.py) on a free port, each with one intra-op thread, compared with
the same run in this process. Every launch has a time limit, so a hang fails the test.
The CLI under torchrun is tested in test_cli_distributed.py."""
from __future__ import annotations

import multiprocessing
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import al_ext
from al_ext.distributed import DistributedConfig
from al_ext.distributed.config import plan_topology

import distributed_worker as worker

LAUNCH_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks are forked from a server that imported torch, its compiler stack (which any torch
# optimiser loads) and al_ext once: seconds less per process than a fresh interpreter.
_FORK = multiprocessing.get_context("forkserver")
_FORK.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "al_ext", "al_ext.distributed",
                              "distributed_worker"])


@dataclass
class Rank:
    returncode: int | None
    stderr: str  # its whole output


def launch(world: int, out: Path, **options: Any) -> list[Rank]:
    """Runs the worker on ``world`` ranks; returns each rank's exit code and output."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = [_FORK.Process(target=worker.run_rank, args=(rank, world, port, str(out), options))
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"ranks {hung} of a distributed run did not end within {LAUNCH_TIMEOUT_S} s (a hang)")
    return [Rank(p.exitcode, (out / f"log{rank}.txt").read_text()) for rank, p in enumerate(procs)]


def check_ok(procs: list[Rank]) -> None:
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{p.stderr[-3000:]}"


def single_process(epochs: int, load: Path | None = None, **options: Any) -> al_ext.Trainer:
    """The run in this process, with the worker's model, data and settings."""
    options = {**worker.DEFAULTS, **options}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # equal intra-op thread counts: bit for bit
    try:
        trainer = worker.trainer(options, None)
        if load is not None:
            trainer.load(load)
        x, y = worker.data(options)
        trainer.fit((x, y), (x, y), epochs=epochs)
    finally:
        torch.set_num_threads(threads)
    return trainer


def assert_states(checkpoint: Path, trainer: al_ext.Trainer, exact: bool) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    ours = trainer.model.state_dict()
    assert saved["model"].keys() == ours.keys()
    for key, value in ours.items():
        if exact:
            assert torch.equal(saved["model"][key], value), key
        else:
            torch.testing.assert_close(saved["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert len(saved["engine"]["optimizers"]) == len(trainer.optimizers)


def rank_results(out: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_results(results: list[dict[str, Any]], trainer: al_ext.Trainer, exact: bool, **options: Any) -> None:
    x, y = worker.data({**worker.DEFAULTS, **options})
    model = trainer.model
    for r in results:  # every rank reports the same, and so would one process
        assert len(r["history"]) == len(trainer.history)
        for theirs, ours in zip(r["history"], trainer.history):
            assert theirs["lr"] == ours["lr"] and theirs["val_accuracy"] == ours["val_accuracy"]
            for key in ("loss_as", "loss_ae"):
                if exact:
                    assert theirs[key] == ours[key]
                else:
                    torch.testing.assert_close(torch.tensor(theirs[key]), torch.tensor(ours[key]), rtol=1e-4, atol=1e-6)
        assert r["evaluation"] == trainer.evaluate((x, y))
        assert torch.equal(r["predict"], model.predict(x[:37]))
        assert torch.equal(r["predict_depth1"], model.predict(x[:37], depth=1))
        classes, depths = model.predict_adaptive(x[:37], 0.6)
        assert torch.equal(r["adaptive"][0], classes) and torch.equal(r["adaptive"][1], depths)


SCHEDULED = dict(schedule="step")  # a learning rate that changes every 3 batches


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stages, one epoch: a consolidated and a sharded checkpoint."""
    out = tmp_path_factory.mktemp("pipeline2")
    check_ok(launch(2, out, stages=2, epochs=1, save=str(out / "epoch1.pt"), sharded_save=str(out / "shards"),
                    **SCHEDULED))
    return out


def assert_optimizer_states(checkpoint: Path, trainer: al_ext.Trainer) -> None:
    saved = torch.load(checkpoint, weights_only=True)["engine"]["optimizers"]
    for theirs, mine in zip(saved, trainer.engine.state_dict()["optimizers"]):
        assert [g["lr"] for g in theirs["param_groups"]] == [g["lr"] for g in mine["param_groups"]]
        for p, state in mine["state"].items():
            for key, value in state.items():
                assert torch.equal(theirs["state"][p][key], value), key


def test_pipeline_across_ranks_equals_sequential_bit_for_bit(pipeline_run: Path, tmp_path: Path) -> None:
    """Two stages save a sharded checkpoint after one epoch; four stages (another number of
    ranks) load it and train the second, stopping the pipeline every 2 batches for a
    checkpoint, and save sharded again; two stages load that and train the third. The
    parameters, optimiser states and learning rates, losses, evaluation and predictions
    equal three sequential epochs in one process, bit for bit."""
    four, two = tmp_path / "four", tmp_path / "two"
    check_ok(launch(4, four, stages=4, epochs=2, load=str(pipeline_run / "shards"), save=str(four / "end.pt"),
                    sharded_save=str(four / "shards"), checkpoint_every=2, max_in_flight=1, **SCHEDULED))
    check_ok(launch(2, two, stages=2, epochs=3, load=str(four / "shards"), save=str(two / "end.pt"), **SCHEDULED))
    for out, epochs, world in ((four, 2, 4), (two, 3, 2)):
        reference = single_process(epochs=epochs, **SCHEDULED)
        assert_states(out / "end.pt", reference, exact=True)
        assert_optimizer_states(out / "end.pt", reference)
        assert_same_results(rank_results(out, world), reference, exact=True)


def test_a_distributed_checkpoint_continues_in_one_process(pipeline_run: Path) -> None:
    """The consolidated file that rank 0 wrote is a single-process checkpoint."""
    resumed = single_process(epochs=2, load=pipeline_run / "epoch1.pt", **SCHEDULED)
    straight = single_process(epochs=2, **SCHEDULED)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    timeless = [{k: v for k, v in r.items() if k not in ("samples_per_s", "train_time_s", "label_warmup_time_s")}
                for r in straight.history]
    assert [{k: r[k] for k in t} for r, t in zip(resumed.history, timeless)] == timeless


def test_data_parallel_equals_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """Two replicas (autograd path) continue a single-process checkpoint: the same as one
    process with the global batch, within float tolerance."""
    first = single_process(epochs=1, backend="reference")
    first.save(tmp_path / "single.pt")
    check_ok(launch(2, tmp_path, stages=1, replicas=2, backend="reference", epochs=2, load=str(tmp_path / "single.pt"),
                    save=str(tmp_path / "end.pt")))
    reference = single_process(epochs=2, backend="reference")
    assert_states(tmp_path / "end.pt", reference, exact=False)
    assert_same_results(rank_results(tmp_path, 2), reference, exact=False)


def test_pipeline_and_data_parallel_together(tmp_path: Path) -> None:
    """2 stages x 2 replicas of fused blocks with a per-step schedule; the last batch holds
    one sample, so one replica's share is empty."""
    options = dict(samples=129, schedule="step")
    check_ok(launch(4, tmp_path, stages=2, replicas=2, save=str(tmp_path / "end.pt"), **options))
    reference = single_process(epochs=2, **options)
    assert_states(tmp_path / "end.pt", reference, exact=False)
    results = rank_results(tmp_path, 4)
    assert_same_results(results, reference, exact=False, **options)
    # Placed by the times rank 0 measured on the first batch: the replicas of a stage alike,
    # the stages covering the blocks in order.
    costs = results[0]["block_costs"]
    assert all(r["block_costs"] == costs for r in results) and max(costs) < 1.0  # seconds, not parameter counts
    starts = al_ext._extension._C.balanced_groups(costs, 2)
    assert [r["blocks"] for r in results] == [list(range(starts[0], starts[1]))] * 2 + [list(range(starts[1], 4))] * 2
    assert not any(r["in_scheduler"] for r in results)  # replicas run their blocks one after another


def test_conv_blocks_pipelined_across_ranks_bit_for_bit(tmp_path: Path) -> None:
    """ALCNN: 4-D activations between the stages, blocks trained through autograd."""
    options = dict(cnn=True, blocks=3)
    check_ok(launch(2, tmp_path, stages=2, save=str(tmp_path / "end.pt"), **options))
    reference = single_process(epochs=2, **options)
    assert_states(tmp_path / "end.pt", reference, exact=True)
    assert_same_results(rank_results(tmp_path, 2), reference, exact=True, **options)


@pytest.mark.parametrize("options", [dict(schedule="step", checkpoint_every=3), dict(cnn=True, blocks=4)],
                         ids=["fused-blocks", "conv-blocks"])
def test_each_rank_pipelines_its_blocks_in_threads_bit_for_bit(tmp_path: Path, options: dict[str, Any]) -> None:
    """Two ranks of two blocks each, every rank running its blocks as a pipeline of two
    threads in al_ext's scheduler: still the parameters of one sequential process."""
    check_ok(launch(2, tmp_path, stages=2, rank_stages=2, save=str(tmp_path / "end.pt"), **options))
    options.pop("checkpoint_every", None)
    reference = single_process(epochs=2, **options)
    assert_states(tmp_path / "end.pt", reference, exact=True)
    results = rank_results(tmp_path, 2)
    # Placed by measured times: a rank may get one block, which it runs alone; 4 blocks on 2 ranks
    # leave at least one rank with several.
    assert all(r["in_scheduler"] == (len(r["blocks"]) >= 2) for r in results)
    assert any(r["in_scheduler"] for r in results)
    assert_same_results(results, reference, exact=True, **options)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stop_asked_on_any_rank_stops_every_rank_at_one_place(tmp_path: Path, rank: int) -> None:
    """A callback sets should_stop on one rank alone: every rank ends the run at the same
    batch, with the same history, and evaluates together afterwards."""
    check_ok(launch(2, tmp_path, stages=2, epochs=3, stop_at=[rank, 3]))
    results = rank_results(tmp_path, 2)
    assert results[0]["position"] == results[1]["position"] != (3, 0)
    assert [h["loss_as"] for h in results[0]["history"]] == [h["loss_as"] for h in results[1]["history"]]
    assert results[0]["evaluation"] == results[1]["evaluation"]


def test_replicas_that_read_different_batches_are_refused(tmp_path: Path) -> None:
    procs = launch(2, tmp_path, stages=1, replicas=2, seed_per_rank=True)
    assert all(p.returncode != 0 for p in procs)
    assert "replicas read different batches" in _stderr_of(procs)


def _stderr_of(procs: list[Rank]) -> str:
    return "\n".join(p.stderr for p in procs)


def test_a_rank_that_raises_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    start = time.monotonic()
    procs = launch(2, tmp_path, stages=2, fail=[1, 3])
    assert all(p.returncode != 0 for p in procs)
    assert "DistributedError: rank 0 stopped: rank 1 failed: RuntimeError: injected failure at step 3" in procs[0].stderr
    assert time.monotonic() - start < 30


def test_rank_0_failing_ends_the_others_too(tmp_path: Path) -> None:
    """Rank 0 hosts the job's store; the others still end, saying so."""
    start = time.monotonic()
    procs = launch(2, tmp_path, stages=2, fail=[0, 3], timeout_s=30)
    assert all(p.returncode != 0 for p in procs)
    assert "DistributedError: rank 1 stopped" in procs[1].stderr
    assert time.monotonic() - start < 25


def test_a_killed_rank_ends_the_job_in_bounded_time(tmp_path: Path) -> None:
    """A rank killed outright says nothing; its peers see its connections close."""
    start = time.monotonic()
    procs = launch(2, tmp_path, stages=2, fail=[1, 3, "die"], timeout_s=30)
    assert time.monotonic() - start < 25  # well within the timeout: the peer's connections closed
    assert procs[1].returncode != 0
    assert procs[0].returncode != 0
    assert "waiting for rank 1" in procs[0].stderr and "That rank failed, died or did not answer" in procs[0].stderr


def test_ranks_that_build_different_models_are_refused_at_the_start(tmp_path: Path) -> None:
    procs = launch(2, tmp_path, stages=2, mismatch=True)
    assert all(p.returncode != 0 for p in procs)
    assert "every rank must build the same model" in _stderr_of(procs)
    assert "blocks.3.b.0.weight ([16, 16] against [16, 20]" in _stderr_of(procs)
    procs = launch(2, tmp_path / "activation", stages=2, mismatch="activation", epochs=1)
    assert all(p.returncode != 0 for p in procs)
    assert "every rank must build the same model" in _stderr_of(procs)
    assert "in '(2): Tanh()' against '(2): ELU(alpha=1.0)'" in _stderr_of(procs)


def test_a_fit_given_val_on_some_ranks_only_is_refused_at_once(tmp_path: Path) -> None:
    """Rank 0 would evaluate after the first epoch while rank 1 went on: both waited until the
    timeout, then failed saying that a peer did not answer."""
    procs = launch(2, tmp_path, stages=2, val_on_rank0_only=True)
    for me, p in enumerate(procs):
        other = 1 - me
        expected = f"fit must be called alike on every rank: rank {other} has val given {other == 0}, rank {me} {me == 0}"
        assert p.returncode != 0 and expected in p.stderr, p.stderr[-2000:]


def test_a_fit_that_one_rank_refuses_ends_every_rank_at_once(tmp_path: Path) -> None:
    """Only the writing rank checks the checkpoint's folder: the others waited for it in the
    first collective until the timeout."""
    start = time.monotonic()
    procs = launch(2, tmp_path, stages=2, checkpoint_every=2, checkpoint_folder="/no/such/folder")
    assert "ValueError: checkpoint: the folder '/no/such/folder'" in procs[0].stderr, procs[0].stderr[-2000:]
    assert "rank 0 refused fit (ValueError: checkpoint: the folder '/no/such/folder'" in procs[1].stderr, \
        procs[1].stderr[-2000:]
    assert all(p.returncode != 0 for p in procs) and time.monotonic() - start < 40  # the ranks' timeout is 60 s


def test_the_data_fingerprint_tells_order_apart_and_adds_up_over_batches() -> None:
    from al_ext.distributed.inference import data_fingerprint
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randint(3, (40,), generator=g)
    whole = data_fingerprint(x, y)
    order = torch.randperm(40, generator=g)
    assert not torch.equal(whole, data_fingerprint(x[order], y[order]))  # the same rows, shuffled
    assert torch.allclose(whole, data_fingerprint(x[:16], y[:16]) + data_fingerprint(x[16:], y[16:], first_row=16))
    x[3, 1], x[5, 0] = float("nan"), float("inf")
    assert torch.equal(data_fingerprint(x, y), data_fingerprint(x.clone(), y))  # NaN agrees with itself
    assert torch.equal(data_fingerprint(x[:0], y[:0]), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("bug, message", [
    ("eval_differs", "the first stage's replicas read different evaluation data"),
    ("predict_differs", "x must hold the same rows on every rank"),
])
@pytest.mark.parametrize("stages", [1, 2])
def test_replicas_that_evaluate_or_predict_different_inputs_are_refused(tmp_path: Path, bug: str, message: str,
                                                                        stages: int):
    """Evaluation summed each replica's count of its own share, so replicas that read
    different data (a DistributedSampler) were counted over a mix of both; predict on inputs
    of different lengths aborted a rank inside Gloo. Every rank says so at once, the later
    stage's too (it reads nothing, and waited until the timeout)."""
    start = time.monotonic()
    procs = launch(2 * stages, tmp_path, stages=stages, replicas=2, epochs=1, **{bug: True})
    assert all(p.returncode != 0 for p in procs), _stderr_of(procs)
    for p in procs:
        assert message in p.stderr and "ValueError" in p.stderr, p.stderr[-2000:]
    assert time.monotonic() - start < 40  # the ranks' timeout is 60 s


# ---- in this process ----------------------------------------------------------------------

@pytest.mark.parametrize("config, world, message", [
    (DistributedConfig(pipeline_stages=3), 2, "must equal the world size 2"),
    (DistributedConfig(pipeline_stages=2, data_parallel=3), 4, "launch 6 processes"),
    (DistributedConfig(pipeline_stages=5), 5, "more than the model's 4 blocks"),
])
def test_configurations_that_cannot_run_are_refused(config: DistributedConfig, world: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_topology(config, world, 0, [1.0, 1.0, 1.0, 1.0])


def test_stages_are_balanced_by_cost_and_ranks_laid_out_stage_by_stage() -> None:
    top = plan_topology(DistributedConfig(pipeline_stages=2, data_parallel=2), 4, 3, [8.0, 1.0, 1.0, 1.0])
    assert (top.stage, top.replica, list(top.blocks)) == (1, 1, [1, 2, 3])
    assert top.stage_ranks(0) == [0, 1] and top.rank_of(0) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline_stages=0), "pipeline_stages"),
    (dict(data_parallel=-1), "data_parallel"),
    (dict(max_in_flight=0), "max_in_flight"),
    (dict(timeout_s=0), "timeout_s"),
])
def test_bad_config_values_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_distributed_without_a_launcher_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        al_ext.Trainer(worker.model(worker.DEFAULTS), distributed=DistributedConfig())
    with pytest.raises(TypeError, match="DistributedConfig"):
        al_ext.Trainer(worker.model(worker.DEFAULTS), distributed={"pipeline_stages": 2})


def test_sharded_checkpoints_belong_to_distributed_runs(tmp_path: Path) -> None:
    trainer = al_ext.Trainer(worker.model(worker.DEFAULTS), progress=False)
    with pytest.raises(ValueError, match="one process"):
        trainer.save(tmp_path / "shards", sharded=True)
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="sharded checkpoint"):
        trainer.load(tmp_path / "dir")
