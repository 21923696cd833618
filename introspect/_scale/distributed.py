"""The ranks of a multi-process extraction: the world, barriers, joining and launching.

Under ``torchrun`` each rank extracts its share and rank 0 writes the manifest after a
barrier. The collectives carry no tensors (barriers only), so they run over gloo whatever
device the model is on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from introspect._errors import ExtractionError

__all__ = ["as_ranks", "init_distributed", "launch"]


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Returns whether this process is one rank of several. The group is gloo: extraction's
    collectives are barriers that carry no tensors, so they need no GPU transport.

    Example:
        >>> import os
        >>> "WORLD_SIZE" in os.environ or init_distributed()
        False
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        # A rank may finish its share long before the slowest one: wait as long as it takes
        # (a rank that dies is torchrun's to notice; it stops the others).
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return True


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m introspect ARGV`` as ``nproc`` ranks on this machine through torchrun.

    A rank that fails stops the others (torchrun does that); the error names it.

    Example:
        >>> launch(["adapters"], 0)
        Traceback (most recent call last):
        ...
        introspect._errors.ExtractionError: --nproc must be at least 1, got 0
    """
    if nproc < 1:
        raise ExtractionError(f"--nproc must be at least 1, got {nproc}")
    import logging
    import signal

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    torchrun: Any = run  # untyped
    args = torchrun.parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "introspect", *argv]
    )
    # torchrun changes the process it runs in: it installs its own signal handlers, sets
    # OMP_NUM_THREADS and logs each step. Keep it to the launch, so a caller (a notebook, a
    # test) is left as it was.
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:
        # One OpenMP pool per core, not one per rank per core.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    quiet = [logging.getLogger(name) for name in ("torch.distributed", "torch.distributed.run")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (
            f"killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exit status {failure.exitcode}"
        )
        raise ExtractionError(
            f"rank {rank} of {nproc} failed ({how}): torchrun stopped the other ranks and no "
            "manifest was written; rerun the same command to resume"
        ) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return 0


def as_ranks(
    nproc: int,
    argv: Sequence[str],
    device: str | None,
    run: Callable[[str | None], dict[str, Any]],
) -> dict[str, Any] | None:
    """Run an extraction as this process's share of a multi-process run.

    Outside torchrun with ``nproc > 1``: launch ``nproc`` ranks of ``python -m introspect
    ARGV`` on this machine (:func:`launch`) and return ``None`` once they all finished.
    Otherwise join the process group torchrun describes (if any), call ``run(device)`` with
    the device this rank uses (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun), leave the
    group on every exit path and return what ``run`` returned (the manifest).

    Example:
        >>> as_ranks(1, [], None, lambda device: {"device": device})
        {'device': None}
    """
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        launch(argv, nproc)
        return None
    distributed = init_distributed()
    try:
        if distributed and device is not None and device.startswith("cuda") and ":" not in device:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return run(device)
    finally:
        if distributed:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
