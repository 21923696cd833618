"""How many threads torch computes on during the tests.

Tiny models compute on one thread. Their operations are microseconds of work, less than
OpenMP's hand-off to a second thread; where the cores are also busy with other work, every
hand-off waits for the other thread to be scheduled, and a tiny model's forward takes ten
times as long (the stateful test of captures and edits took 57 s on two threads and 5 s on one,
on two shared cores). The real SmolLM2 computes enough per operation to use every thread:
its tests run inside :func:`all_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ALL_THREADS", "all_threads"]

ALL_THREADS = torch.get_num_threads()
"""torch's own choice before the tests change it (the cores, or ``OMP_NUM_THREADS``)."""


@contextmanager
def all_threads() -> Iterator[None]:
    """Compute on :data:`ALL_THREADS` threads inside the block, as many as before it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(ALL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
