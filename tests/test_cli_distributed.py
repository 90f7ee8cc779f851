"""``al-ext train --distributed`` under torchrun (two Gloo processes), against the same
command in one process; and the flags' refusals."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from al_ext import cli

TORCHRUN = shutil.which("torchrun")
COMMAND = ["train", "--dataset", "digits", "--hidden", "32,32,32", "--label-dim", "16", "--bridge-factor", "2",
           "--epochs", "2", "--batch-size", "64", "--no-progress"]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on the PATH")
def test_torchrun_pipeline_stages_train_as_one_process_would(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "al_ext", *COMMAND, "--distributed",
                          "--pipeline-stages", "2", "--save", str(tmp_path / "two.pt"), "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("AL epoch   2/2") == 1  # rank 0 alone prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*COMMAND, "--save", str(tmp_path / "one.pt")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("two", "one"))
    for key, value in one["model"].items():
        assert torch.equal(two["model"][key], value), key
    assert [r["loss_ae"] for r in two["history"]] == [r["loss_ae"] for r in one["history"]]


@pytest.mark.parametrize("flags, message", [
    (["--pipeline-stages", "2"], "need --distributed"),
    (["--data-parallel", "2"], "need --distributed"),
    (["--distributed", "--compare-bp"], "does not take --compare-bp"),
    (["--distributed", "--pipeline"], "does not take --pipeline"),
])
def test_distributed_flags_that_cannot_run_are_refused(flags: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*COMMAND, *flags]) == 2
    assert message in capsys.readouterr().err


def test_distributed_outside_a_launcher_says_to_use_torchrun(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main([*COMMAND, "--distributed"]) == 2
    assert "torchrun" in capsys.readouterr().err
