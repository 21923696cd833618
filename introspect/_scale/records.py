"""The records an extraction keeps in its folder: checked before any work, written last.

``progress.json`` holds the settings of an unfinished extraction: :func:`check_output_dir`
checks a rerun against it (or against a finished one's ``manifest.json``), :func:`kept` says
what a rerun keeps. ``manifest.json`` is written last, once every document is in a shard
(:func:`_finish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from introspect._errors import DatasetError, ExtractionError
from introspect._scale.dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    WORK,
    is_ours,
    read_json,
)
from introspect._scale.files import _fsync_dir, _write_json
from introspect._scale.shards import _Done, _remaining, _scan, _totals
from introspect._version import __version__

__all__ = ["check_output_dir", "kept"]


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    found = []
    for key, value in ours.items():
        if key not in theirs or theirs[key] == value:
            continue
        if key == "inputs":
            found.append("the inputs' content differs")
        else:
            found.append(f"{key}: {json.dumps(theirs[key])} there, {json.dumps(value)} now")
    return found


def check_output_dir(
    out: str | os.PathLike[str],
    settings: Mapping[str, Any],
    *,
    force: bool = False,
    weights: str | None = None,
) -> Literal["new", "resume", "complete"]:
    """What ``out`` holds, checked against ``settings`` before any work (nothing is changed).

    ``"new"``: nothing yet, or ``force`` and only an extraction's files (they will be
    replaced); ``"resume"``: an unfinished extraction with these settings; ``"complete"``: a
    finished one. A file, a folder holding anything else, or an extraction with other settings
    (without ``force``) is an error; so is one of other weights, when ``weights`` (the model's
    :func:`weights_fingerprint`) is given and the folder recorded its own.

    Example:
        >>> import tempfile
        >>> check_output_dir(Path(tempfile.mkdtemp()) / "acts", {"model": "toy-llama"})
        'new'
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExtractionError(
            f"--out {out} is a file: name a folder (new or empty) for the dataset"
        )
    if not folder.exists():
        return "new"
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise ExtractionError(f"cannot read --out {out}: {exc.strerror or exc}") from None
    foreign = [name for name in entries if not is_ours(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise ExtractionError(
            f"--out {out} holds files introspect extract did not write ({shown}): choose a new "
            "or empty folder (--force never deletes files it did not write)"
        )
    if not entries:
        return "new"
    record_path = folder / MANIFEST if (folder / MANIFEST).is_file() else folder / PROGRESS
    if not record_path.is_file():
        if force:
            return "new"
        raise ExtractionError(
            f"--out {out} holds shards but neither {MANIFEST} nor {PROGRESS}: add --force to "
            "delete them and start over"
        )
    record = read_json(record_path)
    if record.get("format") != FORMAT:
        raise ExtractionError(f"{record_path} was not written by introspect extract")
    if force:
        return "new"
    differ = _differences(record.get("settings", {}), settings)
    if differ:
        raise ExtractionError(
            f"--out {out} holds an extraction made with other arguments ({'; '.join(differ)}): "
            "rerun with the same arguments to resume it, or add --force to start over"
        )
    theirs = record.get("weights")
    if weights is not None and theirs is not None and theirs != weights:
        # Same name, other values (a checkpoint folder trained further, another model of the
        # class): resuming would mix two models' rows, and "complete" would hand back the other's.
        raise ExtractionError(
            f"--out {out} holds an extraction of other weights than this model's (weights "
            f"fingerprint {theirs} there, {weights} now, for model {settings.get('model')!r}): "
            "its activations are another model's; use another --out for this one, or add "
            "--force to replace them"
        )
    return "complete" if record_path.name == MANIFEST else "resume"


def kept(out: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, int] | None:
    """What an unfinished extraction with ``settings`` has on disk in ``out``: its complete
    shards, their documents, rows and tokens (what a rerun of the same command keeps).

    ``None`` when ``out`` holds no unfinished extraction with these settings (nothing written
    yet, a finished one, another one). Nothing is changed.

    Example:
        >>> import tempfile
        >>> kept(Path(tempfile.mkdtemp()) / "acts", {"model": "toy-llama"}) is None
        True
    """
    folder = Path(out).expanduser()
    try:
        record = read_json(folder / PROGRESS)
        if _differences(record.get("settings", {}), settings):
            return None
        done = _scan(folder, str(record["fingerprint"]))
    except (ExtractionError, DatasetError, KeyError, OSError):
        return None
    return _totals(done)


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "introspect": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _finish(
    folder: Path,
    done: list[_Done],
    progress: Mapping[str, Any],
    total: int,
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of a folder whose shards cover every document, written last."""
    if _remaining(done, total):
        missing = _remaining(done, total)[0]
        raise ExtractionError(
            f"documents {missing[0]}..{missing[1] - 1} have no shard in {folder}: rerun the same "
            "command to extract them"
        )
    shards = []
    row = 0
    truncated: list[list[int]] = []
    empty: list[int] = []
    for shard in done:
        shards.append(
            {"file": shard.file, "docs": [shard.first, shard.end], "rows": [row, row + shard.rows]}
        )
        row += shard.rows
        truncated.extend(shard.truncated)
        empty.extend(shard.empty)
    shapes = done[0].shapes if done else {}
    settings = progress["settings"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "complete",
        "fingerprint": progress["fingerprint"],
        "model": settings["model"],
        "model_class": progress["model_class"],
        "weights": progress.get("weights"),
        "model_dtype": settings.get("model_dtype"),
        "adapter": settings.get("adapter"),
        "num_blocks": progress["num_blocks"],
        "locators": progress["locators"],
        "requested": settings["locators"],
        "shapes": shapes,
        "dtype": settings["dtype"],
        "positions": settings["positions"],
        "max_length": settings.get("max_length"),
        "inputs": progress["inputs"],
        "documents": {"total": total, "done": total, "empty": empty},
        "truncation": {
            "max_length": settings.get("max_length"),
            "documents": len(truncated),
            "tokens_removed": sum(n - int(settings["max_length"]) for _, n in truncated),
            "lengths": truncated,
        },
        "rows": row,
        "bytes_per_row": progress.get("bytes_per_row"),
        "shards": shards,
        "settings": settings,
        "versions": _versions(),
        "run": dict(run),
    }
    _write_json(folder / MANIFEST, manifest)
    with contextlib.suppress(FileNotFoundError):
        (folder / PROGRESS).unlink()
    shutil.rmtree(folder / WORK, ignore_errors=True)
    _fsync_dir(folder)
    return manifest
