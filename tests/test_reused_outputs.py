"""Steps whose outputs are buffers they write again at their next call, as a CUDA graph's
replay is (StepResult::outputs_reused): the executor copies them only where they leave their
stage, since the queue to the next stage may hold them over that call. On the CPU the
stage's thread plays the part of its stream; tests/test_pipeline_cuda.py has the graphs."""
import time

import torch

from al_ext._extension import _C

BATCHES = 6


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((4,), float(j)), torch.zeros(2)) for j in range(BATCHES)]


def doubling_into_one_buffer(reuses_outputs: bool):
    """s = 2 * s_prev, written into the same buffer at every call."""
    s_out, t_out = torch.empty(4), torch.empty(2)

    def step(s_prev, t_prev):
        s_out.copy_(s_prev * 2)
        t_out.copy_(t_prev)
        return s_out, t_out, torch.tensor(0.0), torch.tensor(0.0)

    return _C.python_block_step(step, reuses_outputs=reuses_outputs)


def passing_its_input_on():
    return _C.python_block_step(lambda s, t: (s, t, torch.tensor(0.0), torch.tensor(0.0)))


def slow_recorder(seen: list):
    """Reads its input only after the block below has had time to step later batches."""
    def step(s_prev, t_prev):
        time.sleep(0.02)
        seen.append((s_prev.data_ptr(), s_prev.clone()))
        return s_prev, t_prev, torch.tensor(0.0), torch.tensor(0.0)
    return _C.python_block_step(step)


def values(seen: list) -> list[float]:
    return [float(s[0]) for _, s in seen]


def test_a_reused_buffer_handed_on_uncopied_is_overwritten_before_it_is_read():
    """The premise: without the flag nothing copies the buffer, and the next stage reads a later batch's s."""
    seen = []
    out = _C.run_blocks([doubling_into_one_buffer(False), slow_recorder(seen)], batches(), True, [0, 1], 2, 1, [])
    assert "error" not in out
    assert values(seen) != [2.0 * j for j in range(BATCHES)]


def test_reused_outputs_are_copied_where_they_leave_the_stage():
    seen = []
    out = _C.run_blocks([doubling_into_one_buffer(True), slow_recorder(seen)], batches(), True, [0, 1], 2, 1, [])
    assert "error" not in out
    assert values(seen) == [2.0 * j for j in range(BATCHES)]


def test_a_view_of_a_reused_buffer_passed_on_by_a_later_step_is_copied_too():
    seen = []
    steps = [doubling_into_one_buffer(True), passing_its_input_on(), slow_recorder(seen)]
    out = _C.run_blocks(steps, batches(), True, [0, 2], 2, 1, [])
    assert "error" not in out
    assert values(seen) == [2.0 * j for j in range(BATCHES)]


def test_within_a_stage_reused_outputs_pass_on_uncopied():
    """The next block of the same stage runs before the buffer's next write: it reads the buffer itself."""
    for pipelined, starts in ((False, []), (True, [0])):
        seen = []
        out = _C.run_blocks([doubling_into_one_buffer(True), slow_recorder(seen)], batches(), pipelined, starts, 2, 1,
                            [])
        assert "error" not in out
        assert values(seen) == [2.0 * j for j in range(BATCHES)]
        assert len({ptr for ptr, _ in seen}) == 1, "one buffer, read in place"
