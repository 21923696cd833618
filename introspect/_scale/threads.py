"""The pipeline's threads beside the model: a reader that runs ahead, and the shard writer.

Each sits behind a bounded queue, so memory is bounded by the queues (a few shards), never by
the corpus, and an error in either reaches the caller's thread. A shard is written under a
temporary name, ``fsync``-ed and renamed: it is whole under its name or not there at all.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from introspect._errors import ExtractionError
from introspect._scale.dataset import WORK
from introspect._scale.files import _fsync_dir, _fsync_file, _reason


def _save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file`` (a seam: the fault tests make it fail as a full disk does)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


class _Background:
    """Runs an iterator in a thread, ``size`` items ahead; its errors reach the consumer."""

    _END = object()

    def __init__(self, items: Iterator[Any], size: int, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:
            self._error = exc
        finally:
            with contextlib.suppress(queue.Full):
                self._queue.put(self._END, timeout=0.1)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    item = self._END
                else:
                    continue
            if item is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


_Check = Callable[[Mapping[str, torch.Tensor]], None]


class _Writer:
    """A thread that writes finished shards, at most ``size`` waiting (memory stays bounded)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        # The permissions the umask gives new files (safetensors creates private ones). Read
        # here, on the caller's thread, before the writer thread creates any file.
        mask = os.umask(0o022)
        os.umask(mask)
        self.mode = 0o666 & ~mask
        self.written = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="introspect-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            name, tensors, metadata, check = item
            try:
                check(tensors)
                self._write(self.folder / name, tensors, metadata)
                self.written += 1
            except BaseException as exc:
                self.error = exc
                return

    def _write(
        self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        # Written in the hidden work folder (safetensors itself writes through a temporary
        # file of its own, which a kill would leave beside it), fsync-ed, then renamed into
        # place: a shard is whole under its name or not there at all.
        work = path.parent / WORK
        tmp = work / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            work.mkdir(exist_ok=True)
            _save_file(tensors, str(tmp), metadata)
            os.chmod(tmp, self.mode)
            _fsync_file(str(tmp))
            os.replace(tmp, path)
        except Exception as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ExtractionError(
                f"could not write shard {path}: {_reason(exc)}; the {self.written} shards "
                "written before it are kept: free some space (or fix the folder) and rerun the "
                "same command to resume"
            ) from exc
        _fsync_dir(path.parent)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item: tuple[str, dict[str, torch.Tensor], dict[str, str], _Check]) -> None:
        while True:
            self._check()
            if not self._thread.is_alive():
                raise ExtractionError("the shard writer stopped unexpectedly")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Write what is queued, then stop; raises the first write error."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop after the shard being written (queued shards are recomputed by a rerun)."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join()
