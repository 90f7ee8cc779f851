"""al_ext.large_buffers: freed large CPU buffers are kept for the next request of their size
while a run is open, and given back after; training computes the same with them."""
import multiprocessing
import os
import threading

import pytest
import torch

import al_ext
from al_ext import large_buffers
from al_ext.engines import make_engine
from al_ext.optim import optimizer_factory

LARGE = large_buffers.MIN_BYTES // 4  # float32 elements of the smallest kept buffer


def test_a_freed_large_buffer_serves_the_next_request_of_its_size():
    with large_buffers.reusing_large_buffers():
        first = torch.randn(LARGE)
        address = first.data_ptr()
        del first
        before = large_buffers.stats()
        assert before["kept_bytes"] >= large_buffers.MIN_BYTES
        second = torch.zeros(LARGE)  # the same size: the kept buffer, filled anew
        assert second.data_ptr() == address
        assert large_buffers.stats()["reused"] == before["reused"] + 1
        assert torch.count_nonzero(second) == 0
    assert large_buffers.stats()["kept_bytes"] == 0


def test_small_buffers_and_runs_outside_a_block_are_not_kept():
    with large_buffers.reusing_large_buffers():
        kept = large_buffers.stats()["kept_bytes"]
        torch.randn(LARGE // 2)  # below MIN_BYTES, freed at once
        assert large_buffers.stats()["kept_bytes"] == kept
    torch.randn(LARGE)  # no block open
    assert large_buffers.stats() | {"reused": 0} == dict(users=0, kept_bytes=0, lent_bytes=0, reused=0,
                                                          max_kept_bytes=large_buffers.stats()["max_kept_bytes"])


def test_nested_blocks_keep_buffers_until_the_last_closes():
    with large_buffers.reusing_large_buffers():
        with large_buffers.reusing_large_buffers():
            torch.randn(LARGE)
        assert large_buffers.stats()["users"] == 1
        assert large_buffers.stats()["kept_bytes"] >= large_buffers.MIN_BYTES
    assert large_buffers.stats()["users"] == 0 and large_buffers.stats()["kept_bytes"] == 0


def test_a_buffer_allocated_in_a_block_and_freed_after_it_goes_back():
    with large_buffers.reusing_large_buffers():
        outlives = torch.randn(LARGE)
    assert large_buffers.stats()["lent_bytes"] >= large_buffers.MIN_BYTES
    del outlives
    assert large_buffers.stats()["kept_bytes"] == 0


def test_the_limit_bounds_what_is_kept():
    default = large_buffers.stats()["max_kept_bytes"]
    try:
        large_buffers.set_max_kept_bytes(0)
        with large_buffers.reusing_large_buffers():
            torch.randn(LARGE)
            assert large_buffers.stats()["kept_bytes"] == 0
    finally:
        large_buffers.set_max_kept_bytes(default)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_kept_bytes must be an int >= 0"):
            large_buffers.set_max_kept_bytes(bad)


def test_threads_never_share_a_buffer():
    """Each thread fills its buffers with its own number and reads them back while the others
    allocate and free buffers of the same size: a buffer lent twice would mix them."""
    failures = []

    def churn(k: int) -> None:
        for _ in range(200):
            t = torch.full((LARGE,), float(k))
            if not bool((t == k).all()):
                failures.append(k)
            del t

    with large_buffers.reusing_large_buffers():
        threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures


def _allocate_large() -> None:
    # One thread, as a DataLoader worker runs: GNU OpenMP's pool does not survive fork, and a
    # parallel fill in the child would hang for a reason that is not the cache's.
    torch.set_num_threads(1)
    assert float(torch.ones(LARGE).sum()) == LARGE


def test_a_child_forked_inside_a_block_closes_it_and_keeps_nothing():
    """os.fork in a block: the child leaves the block it inherited as the parent does, and
    gives its buffers back when it frees them (a worker process does not train)."""
    child, keeps_nothing = False, False
    try:
        with large_buffers.reusing_large_buffers():
            pid = os.fork()
            child = pid == 0
            if child:
                torch.set_num_threads(1)  # GNU OpenMP's pool does not survive fork
                kept = large_buffers.stats()["kept_bytes"]  # the parent's, inherited
                torch.empty(LARGE)  # freed at once
                keeps_nothing = large_buffers.stats()["kept_bytes"] == kept
    except BaseException:
        if child:  # the child reports through its exit status, never into the test run
            os._exit(1)
        raise
    if child:
        os._exit(0 if keeps_nothing else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "1: closing the inherited block failed; 2: the child kept a buffer"


def test_a_process_forked_inside_a_block_allocates():
    """fork holds the cache's lock, so a child (a DataLoader worker) never inherits it held."""
    stop = threading.Event()

    def churn() -> None:  # takes and lets go of the lock all the time, as pipeline workers do
        while not stop.is_set():
            torch.empty(LARGE)

    with large_buffers.reusing_large_buffers():
        thread = threading.Thread(target=churn)
        thread.start()
        try:
            for _ in range(3):
                child = multiprocessing.get_context("fork").Process(target=_allocate_large)
                child.start()
                child.join(timeout=60)
                if child.is_alive():  # never leave a hung child holding the test run's output open
                    child.kill()
                    child.join()
                assert child.exitcode == 0, "the child hung or failed allocating a large buffer"
        finally:
            stop.set()
            thread.join()


@pytest.mark.parametrize("pipeline", [False, True])
def test_training_reuses_large_buffers_and_computes_the_same(pipeline):
    """An encoder wide enough for a weight gradient above MIN_BYTES; a run in the engine (which
    keeps large buffers) against step() batch by batch (which opens no block)."""
    torch.manual_seed(0)
    model = al_ext.ALMLP(in_features=1024, num_classes=4, hidden=(512,), label_dim=64, backend="reference")
    twin = al_ext.ALMLP(in_features=1024, num_classes=4, hidden=(512,), label_dim=64, backend="reference")
    twin.load_state_dict(model.state_dict())
    assert model.blocks[0].f[-2].weight.numel() * 4 >= large_buffers.MIN_BYTES
    batches = [(torch.randn(8, 1024), torch.randint(0, 4, (8,))) for _ in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pipeline's stages run one thread each: equal rounding
    try:
        engine = make_engine(model, optimizer_factory("adam"), 1e-3, pipeline=pipeline)
        reused = large_buffers.stats()["reused"]
        engine.run(batches, on_batch=lambda index, losses: False)
        assert large_buffers.stats()["reused"] > reused
        reference = make_engine(twin, optimizer_factory("adam"), 1e-3)
        for x, y in batches:
            reference.step(x, y)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert large_buffers.stats()["users"] == 0
