"""Durable file operations in an extraction folder: fsync, atomic JSON, clearing its files.

What is written here is whole under its name or not there at all, and on disk (``fsync``-ed,
the folder too) before the next step counts on it. Clearing touches only the files
``introspect extract`` writes (:func:`introspect._scale.dataset.is_ours`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from introspect._export import write_atomically
from introspect._scale.dataset import WORK, is_ours


def _clear(folder: Path, *, hidden_only: bool = False) -> None:
    """Delete extract's files in ``folder`` (only the temporary, hidden ones if asked)."""
    for name in os.listdir(folder):
        if not is_ours(name) or (hidden_only and not name.startswith(".")):
            continue
        if name == WORK:
            shutil.rmtree(folder / name, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        _fsync_file(tmp)

    write_atomically([(path, write)])
    _fsync_dir(path.parent)


def _reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), for an error line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
