"""Large CPU buffers kept for reuse while al_ext trains.

Each training step frees and allocates the same large tensors (a wide bridge's weight
gradient; under autocast its bfloat16 copy). glibc's malloc gives buffers above its mmap
threshold (at most 32 MiB, and in any thread but the main one whatever does not fit a 64 MiB
heap) back to the kernel when they are freed, and the next step's allocation faults in fresh
pages that the kernel zero-fills. On this project's CPU that was 30 of the 70 ms of ALCNN's
first block's step in bf16 (benchmarks/RESULTS.md).

While a ``reusing_large_buffers()`` block is open, al_ext's CPU allocator (installed on first
use in front of torch's) keeps each freed buffer of at least ``MIN_BYTES`` for the next
request of the same size, as the CUDA caching allocator does on a GPU, up to ``max_kept_bytes``
(2 GiB by default) at once. Closing the last open block gives them back. Nothing changes in
what is computed: the same sizes are allocated, only not from fresh pages.

The engines and the Pipeline open one around every training run. A hand-written loop gets the
same with ``with al_ext.large_buffers.reusing_large_buffers():`` around it, or with a malloc
that keeps memory (jemalloc or tcmalloc through LD_PRELOAD).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ._extension import _C

MIN_BYTES: int = _C.large_buffer_min_bytes


@contextlib.contextmanager
def reusing_large_buffers() -> Iterator[None]:
    """Keeps freed CPU buffers of at least MIN_BYTES for reuse while the block is open.
    Blocks may nest and be open on several threads at once; the last one to close gives the
    kept buffers back to the system."""
    _C.enable_large_buffer_cache()
    try:
        yield
    finally:
        _C.disable_large_buffer_cache()


def set_max_kept_bytes(max_kept_bytes: int) -> None:
    """The most bytes of freed buffers kept at once (0: none, which turns reuse off)."""
    if isinstance(max_kept_bytes, bool) or not isinstance(max_kept_bytes, int) or max_kept_bytes < 0:
        raise ValueError(f"max_kept_bytes must be an int >= 0, got {max_kept_bytes!r}")
    _C.set_large_buffer_cache_limit(max_kept_bytes)


def stats() -> dict[str, int]:
    """users (open blocks), kept_bytes, lent_bytes (buffers in use that came through the
    cache), reused (requests served from kept buffers since the process started) and
    max_kept_bytes."""
    return dict(_C.large_buffer_cache_stats())
