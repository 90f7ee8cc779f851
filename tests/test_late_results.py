"""The executor when a step's results come late, on the CPU.

A CUDA stage reads each step's losses and time up to max_in_flight batches after it enqueued
the step. `hold_back_results` makes CPU stages read theirs just as late (the latest a CUDA
stage may), so that this path is tested on a machine without a GPU: every result is still
read, and a fault found late still names its block and batch and stops the run.
"""
import math

import pytest
import torch

from al_ext._extension import _C

BLOCKS, BATCHES = 3, 10


def tracing_steps(ran: list[tuple[int, int]], non_finite=None, raises=None) -> list:
    """Python block steps that pass (s, t) on and record which (block, batch) ran. Batch j's s
    holds j. The loss of (block, batch) is 10 * batch + block, NaN at `non_finite`; the step
    at `raises` raises."""

    def make(block: int):
        def step(s, t):
            batch = int(s[0])
            ran.append((block, batch))
            if (block, batch) == raises:
                raise RuntimeError("boom")
            loss = math.nan if (block, batch) == non_finite else 10.0 * batch + block
            return s, t, torch.tensor(loss), torch.tensor(-loss)

        return _C.python_block_step(step)

    return [make(b) for b in range(BLOCKS)]


def run(steps, pipelined: bool, hold_back: int) -> dict:
    batches = [(torch.tensor([float(j)]), torch.zeros(1)) for j in range(BATCHES)]
    starts = list(range(BLOCKS)) if pipelined else []
    return _C.run_blocks(steps, batches, pipelined, starts, 2, 1, [], hold_back_results=hold_back)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_every_late_result_is_read(pipelined):
    out = run(tracing_steps([]), pipelined, hold_back=3)
    assert "error" not in out
    expected = torch.tensor([[[10.0 * j + b, -(10.0 * j + b)] for b in range(BLOCKS)] for j in range(BATCHES)],
                            dtype=torch.float64)
    assert torch.equal(out["losses"], expected)
    assert [b["batches"] for b in out["blocks"]] == [BATCHES] * BLOCKS


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_a_non_finite_loss_read_late_names_its_block_and_batch(pipelined):
    ran = []
    out = run(tracing_steps(ran, non_finite=(1, 3)), pipelined, hold_back=2)
    block, batch, message, loss = out["error"]
    assert (block, batch, loss) == (1, 3, "L_as") and "block 2 failed on batch 3: non-finite loss" in message
    # Read once its stage stepped batch 5, and nothing ran after that in the stage: in the
    # sequential mode (one stage) block 1 on batch 5 was the last step; pipelined, block 2's
    # own stage stopped after batch 5.
    if pipelined:
        assert max(j for b, j in ran if b == 1) == 5
    else:
        assert ran[-1] == (0, 5) and (2, 4) in ran


@pytest.mark.parametrize("hold_back", [0, 2])
def test_an_error_after_an_unread_non_finite_loss_reports_the_loss(hold_back):
    """The step after the bad one raises before the bad loss is read: the loss came first."""
    out = run(tracing_steps([], non_finite=(1, 3), raises=(1, 4)), True, hold_back)
    assert out["error"][:2] == (1, 3) and "non-finite loss" in out["error"][2]


def test_an_error_is_reported_where_it_happened_when_earlier_results_are_fine():
    out = run(tracing_steps([], raises=(2, 6)), True, hold_back=2)
    assert out["error"][:2] == (2, 6) and "boom" in out["error"][2]


def test_hold_back_must_not_be_negative():
    with pytest.raises(ValueError, match="hold_back_results must be at least 0, got -1"):
        run(tracing_steps([]), True, hold_back=-1)
