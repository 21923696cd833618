"""How many threads torch computes on during the tests.

Tiny models compute on one thread. Their operations are microseconds of work, less than
OpenMP's hand-off to a second thread; where the cores are also busy with other work, every
hand-off waits for the other thread to be scheduled, and a tiny model's forward takes ten
times as long (the stateful test of captures and edits took 57 s on two threads and 5 s on one,
on two shared cores). The real SmolLM2 computes enough per operation to use every thread:
its tests run inside :func:`all_threads`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["ALL_THREADS", "all_threads"]

ALL_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
"""This test process's share of torch's own choice (the cores, or ``OMP_NUM_THREADS``): all of
it in one test process, a worker's share under pytest-xdist. Two workers on two threads each
share two cores badly: OpenMP's threads wait for each other (a SmolLM2 page took 80 s so, and
32 s on one thread each)."""


@contextmanager
def all_threads() -> Iterator[None]:
    """Compute on :data:`ALL_THREADS` threads inside the block, as many as before it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(ALL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)
