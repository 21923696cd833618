"""Streaming a corpus's activations to disk: the engine behind ``introspect extract``.

The pipeline has three stages, each in its own thread so the model never waits on text or on
the disk: a reader tokenizes the next shard's documents, the caller's thread runs the model
with a capture on padded batches, and a writer thread puts finished shards on disk. The two
queues between them are bounded, so memory is bounded by the queues (a few shards), never by
the corpus.

Folder format (read by :class:`introspect.ActivationDataset`, see ``introspect._dataset``):

- a shard holds a contiguous run of documents, is named after it
  (``shard-000000000-000000128.safetensors``) and describes itself in its header (the run's
  fingerprint, its documents, truncations); it appears under that name only once it is whole
  and on disk (written under a temporary name, ``fsync``-ed, renamed);
- ``progress.json`` holds the arguments of an unfinished extraction, to check a rerun against;
- ``manifest.json`` is written last, when every document is in a shard.

A rerun of the same command therefore resumes: the complete shards are found by name, the
documents they lack are extracted, the result is the one an uninterrupted run gives.

Distributed: under ``torchrun`` each rank takes a deterministic share of the remaining
documents (cut by size), writes its own shards, and rank 0 writes the manifest after a
``torch.distributed`` barrier. The shards, and so the batches, are those of a one-process run
(``_windows``): a rank's forward passes are one process's, and give the same values bit for
bit. The collectives carry no tensors (barriers only), so they run
over gloo whatever device the model is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from introspect._batching import context_length, max_positions, pad_batch, position_ids_from_mask
from introspect._corpus import Inputs, read_inputs
from introspect._dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    TOKEN_COLUMNS,
    WORK,
    is_ours,
    read_json,
    shard_name,
    shard_range,
)
from introspect._errors import DatasetError, ExtractionError, LocatorError
from introspect._export import write_atomically
from introspect._hooks import input_device, onloaded
from introspect._locators import Locator, query_key_site
from introspect._progress import progress_enabled
from introspect._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from introspect._inspector import Inspector

__all__ = [
    "DTYPES",
    "as_ranks",
    "check_output_dir",
    "extract",
    "init_distributed",
    "kept",
    "launch",
    "settings_of",
    "weights_fingerprint",
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The dtypes activations can be stored in (``--dtype``)."""
Position = Literal["all", "last"]
_SHARD_BYTES = 64 * 2**20
"""The default size of a shard, from which ``shard_rows`` is derived."""
_SHARD_TOKENS = 2**15
"""The default most tokens a shard puts through the model (``shard_tokens``): what an
interruption can lose is a few shards of work (about a minute and a half each for SmolLM2 on
two CPU cores), whatever the row size or ``positions``. Tokens, not seconds: the cuts must
be the same in every run, for a resumed run and every rank to cut where one process does."""
_TOKENIZE_CHUNK = 256
_ANCHOR_BYTES = 64 * 2**20
"""Text between anchors (documents where every run starts a shard): at most this much is
tokenized twice, by the rank before a cut between ranks and the rank after it."""


# -- what a run is, and the folder it writes ----------------------------------------------------


def settings_of(
    *,
    model: str,
    locators: Sequence[str],
    inputs: Inputs,
    positions: str = "all",
    dtype: str = "float16",
    text_field: str = "text",
    max_length: int | None = None,
    adapter: str | None = None,
    model_dtype: str | None = None,
) -> dict[str, Any]:
    """What defines an extraction's content: a rerun with other settings is refused.

    Keys left ``None`` (a maximum length or an adapter not chosen yet) are not compared.
    The batch size, the number of processes and the device are not settings: they change how
    the values are computed, not which.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.txt"
        >>> _ = path.write_text("hi\\n")
        >>> s = settings_of(model="toy-llama", locators=["block[:]"], inputs=read_inputs([path]))
        >>> s["locators"], s["dtype"], len(s["inputs"][0])
        (['block[:]'], 'float16', 64)
    """
    found: dict[str, Any] = {
        "model": model,
        "locators": [str(loc) for loc in locators],
        "positions": positions,
        "dtype": dtype,
        # A text file has no fields: its --text-field changes nothing.
        "text_field": None if inputs.kinds == {"txt"} else text_field,
        "inputs": inputs.hashes,
        "max_length": max_length,
        "adapter": adapter,
        "model_dtype": model_dtype,
    }
    return {key: value for key, value in found.items() if value is not None}


def _fingerprint(settings: Mapping[str, Any]) -> str:
    text = json.dumps(dict(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SAMPLES = 64
"""Values of each tensor that go into a weights fingerprint."""
_SPREAD = 2654435761
"""Knuth's multiplicative hash constant: spreads the sampled places over a tensor's elements."""


def _sample(tensor: torch.Tensor) -> bytes:
    """``_SAMPLES`` values of ``tensor`` at fixed places, as bytes that do not depend on the
    device (read where the tensor is, only the sample is copied to the CPU)."""
    count = tensor.numel()
    if count == 0:
        return b""
    places = torch.arange(min(count, _SAMPLES), dtype=torch.long)
    if count > _SAMPLES:
        places = (places * _SPREAD + 1) % count
    flat = tensor.detach().reshape(1) if tensor.dim() == 0 else tensor.detach()
    try:
        index = torch.unravel_index(places.to(flat.device), flat.shape)
        picked = flat[index].cpu()
        if picked.is_complex():
            picked = torch.view_as_real(picked.to(torch.complex128))
        elif picked.is_floating_point():
            picked = picked.to(torch.float64)  # exact for every float dtype
        else:
            picked = picked.to(torch.int64)
        return bytes(picked.numpy().tobytes())
    except (RuntimeError, TypeError, NotImplementedError):
        # A tensor type that cannot be indexed or converted (a quantized layout): its name,
        # shape and dtype still count.
        return b"?"


def _offloaded_sample(model: nn.Module, name: str) -> bytes | None:
    """The sample of a state-dict entry that accelerate offloaded (on the meta device here, its
    values held by the module's hook), or None where no hook holds them."""
    prefix, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
        with onloaded(module, "fingerprinting"):
            value: torch.Tensor | None = module._parameters.get(leaf)
            if value is None:
                value = module._buffers.get(leaf)
            if value is None or value.is_meta:
                return None
            return _sample(value)
    except (AttributeError, ExtractionError):
        return None


def weights_fingerprint(model: nn.Module) -> str:
    """A fingerprint of ``model``'s weights: a hash of its state dict's names, shapes, dtypes
    and 64 values of each tensor at fixed places.

    It reads a few values per tensor, so it costs little for any size of model, and it is the
    same on any device. Weights that accelerate offloaded are read from its hooks; a tensor
    on the meta device that no hook holds counts by its name, shape and dtype only. Two
    checkpoints of one architecture (another training step, a fine-tune) differ in nearly
    every value, so in the fingerprint.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> before = weights_fingerprint(layer)
        >>> with torch.no_grad():
        ...     _ = layer.bias.add_(1)
        >>> len(before), before == weights_fingerprint(layer)
        (16, False)
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        digest.update(f"{name}\0{list(tensor.shape)}\0{tensor.dtype}\0".encode())
        sample = _offloaded_sample(model, name) if tensor.is_meta else _sample(tensor)
        digest.update(sample or b"")
    return digest.hexdigest()[:16]


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
    return {
        "shards": len(done),
        "documents": sum(shard.end - shard.first for shard in done),
        "rows": sum(shard.rows for shard in done),
        "tokens": sum(shard.tokens for shard in done),
    }


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


def _save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file`` (a seam: the fault tests make it fail as a full disk does)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- shards --------------------------------------------------------------------------------------


@dataclass
class _Done:
    """A complete shard, as its header describes it."""

    file: str
    first: int
    end: int
    rows: int
    truncated: list[list[int]]
    empty: list[int]
    shapes: dict[str, list[int]]
    tokens: int = 0


def _scan(folder: Path, fingerprint: str) -> list[_Done]:
    """The complete shards in ``folder``, in document order, checked to belong to this run."""
    from safetensors import safe_open

    found = []
    for name in sorted(os.listdir(folder)):
        docs = shard_range(name)
        if docs is None:
            continue
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["introspect"])
                shapes = {
                    key: list(handle.get_slice(key).get_shape())[1:]
                    for key in handle.keys()  # noqa: SIM118 - safe_open is not a Mapping
                    if key not in TOKEN_COLUMNS
                }
        except Exception as exc:
            raise ExtractionError(
                f"shard {folder / name} cannot be read ({_reason(exc)}): the folder was changed "
                "by hand; rerun with --force to start over"
            ) from None
        if meta.get("fingerprint") != fingerprint:
            raise ExtractionError(
                f"shard {folder / name} belongs to another extraction: rerun with --force to "
                "start over"
            )
        found.append(
            _Done(
                name,
                docs[0],
                docs[1],
                int(meta["rows"]),
                meta["truncated"],
                meta["empty"],
                shapes,
                int(meta.get("tokens", 0)),
            )
        )
    for before, after in itertools.pairwise(found):
        if after.first < before.end:
            raise ExtractionError(
                f"shards {before.file} and {after.file} overlap: the folder was changed by hand; "
                "rerun with --force to start over"
            )
    return found


def _remaining(done: Sequence[_Done], total: int) -> list[tuple[int, int]]:
    gaps = []
    cursor = 0
    for shard in done:
        if shard.first > cursor:
            gaps.append((cursor, shard.first))
        cursor = max(cursor, shard.end)
    if cursor < total:
        gaps.append((cursor, total))
    return gaps


def _share(
    remaining: Sequence[tuple[int, int]], weights: torch.Tensor, rank: int, world: int
) -> list[tuple[int, int]]:
    """Rank ``rank``'s contiguous part of the remaining documents, cut by size."""
    if world == 1 or not remaining:
        return list(remaining)
    docs = torch.cat([torch.arange(a, b) for a, b in remaining])
    cumulative = (weights[docs] + 1).cumsum(0)
    total = int(cumulative[-1])
    cuts = [0]
    for r in range(1, world):
        cuts.append(int(torch.searchsorted(cumulative, total * r // world, right=True)))
    cuts.append(len(docs))
    mine = docs[cuts[rank] : cuts[rank + 1]].tolist()
    runs: list[tuple[int, int]] = []
    for doc in mine:
        if runs and runs[-1][1] == doc:
            runs[-1] = (runs[-1][0], doc + 1)
        else:
            runs.append((doc, doc + 1))
    return runs


@dataclass
class _Window:
    """The tokenized documents of one shard to be."""

    first: int
    ids: list[list[int]] = field(default_factory=list)
    truncated: list[list[int]] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0

    @property
    def end(self) -> int:
        return self.first + len(self.ids)


@dataclass(frozen=True)
class _Run:
    """A run of documents a rank extracts: the shards that start in ``[own, until)``.

    The shards of a run are cut as a one-process run cuts them, from a document where every
    run cuts (``start``: the start of the gap, or the last anchor before ``own``), so the rank
    tokenizes from there and keeps the shards that start in its part; the last one goes on
    past ``until`` to where it closes (at the latest ``end``, the end of the gap).
    """

    start: int
    own: int
    until: int
    end: int


def _anchors(weights: torch.Tensor, every: int | None = None) -> frozenset[int]:
    """Documents where every run starts a new shard: the first to begin after each
    ``every`` bytes of text (``_ANCHOR_BYTES``). They bound what a rank tokenizes to find
    where its part's first shard starts."""
    every = every or _ANCHOR_BYTES
    ends = (weights + 1).cumsum(0)
    if not len(ends) or int(ends[-1]) <= every:
        return frozenset()
    starts = ends - (weights + 1)
    marks = torch.arange(every, int(ends[-1]), every, dtype=torch.long)
    found = torch.searchsorted(starts, marks).tolist()
    return frozenset(doc for doc in found if 0 < doc < len(weights))


def _runs(
    share: Sequence[tuple[int, int]],
    remaining: Sequence[tuple[int, int]],
    anchors: frozenset[int],
) -> list[_Run]:
    """The runs of a rank's ``share`` of the ``remaining`` gaps, each with where its shards'
    cuts start (see :class:`_Run`)."""
    runs = []
    for a, b in share:
        gap = next((g for g in remaining if g[0] <= a < g[1]), (a, b))
        start = max([gap[0], *(doc for doc in anchors if gap[0] < doc <= a)])
        runs.append(_Run(start, a, b, gap[1]))
    return runs


def _windows(
    runs: Sequence[_Run],
    inputs: Inputs,
    tokenize: Callable[[list[str]], list[list[int]]],
    max_length: int | None,
    last: bool,
    shard_rows: int,
    anchors: frozenset[int] = frozenset(),
    *,
    shard_tokens: int | None = None,
) -> Iterator[_Window]:
    """The rank's shards to be, tokenized: for each run, the shards that start in its part.

    A shard closes as soon as it reaches ``shard_rows`` rows or ``shard_tokens`` tokens (after
    truncation: what goes through the model), or the next document is an anchor, so the cuts
    depend only on where a run of documents starts, and every run starts at a cut: a resumed
    run, or a rank of several, cuts its documents as a one-process run does. Its shards, and
    the batches of each shard, are the same, and so are the values, bit for bit.
    """
    most = shard_tokens or _SHARD_TOKENS
    for run in runs:
        yield from _run_windows(run, inputs, tokenize, max_length, last, shard_rows, most, anchors)


def _run_windows(
    run: _Run,
    inputs: Inputs,
    tokenize: Callable[[list[str]], list[list[int]]],
    max_length: int | None,
    last: bool,
    shard_rows: int,
    shard_tokens: int,
    anchors: frozenset[int],
) -> Iterator[_Window]:
    window = _Window(run.start)
    for chunk in range(run.start, run.end, _TOKENIZE_CHUNK):
        stop = min(run.end, chunk + _TOKENIZE_CHUNK)
        for k, ids in enumerate(tokenize(inputs.texts(chunk, stop))):
            doc = chunk + k
            if max_length is not None and len(ids) > max_length:
                window.truncated.append([doc, len(ids)])
                ids = ids[:max_length]
            window.ids.append(ids)
            window.rows += (1 if ids else 0) if last else len(ids)
            window.tokens += len(ids)
            if window.rows >= shard_rows or window.tokens >= shard_tokens or doc + 1 in anchors:
                if window.first >= run.own:
                    yield window
                if doc + 1 >= run.until:
                    return  # the next shard starts in another rank's part
                window = _Window(doc + 1)
    if window.ids and window.first >= run.own:
        yield window


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


# -- distributed -----------------------------------------------------------------------------


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


# -- the engine -------------------------------------------------------------------------------


def _value(cap: Any, loc: Locator) -> Any:
    record = cap[str(loc.with_side("output"))]
    return record.input if loc.side == "input" else record.output


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "introspect": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _tokenizer_fn(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return [list(map(int, ids)) for ids in encoded]

    return tokenize


class _Engine:
    """One rank's extraction: the model, the locators, the batches, the shard buffers."""

    def __init__(
        self,
        insp: Inspector,
        locs: list[Locator],
        *,
        last: bool,
        store: torch.dtype,
        batch_size: int,
        pad_id: int,
    ) -> None:
        self.insp = insp
        self.model = insp.model
        self.locs = locs
        self.keys = [str(loc) for loc in locs]
        self.last = last
        self.store = store
        self.batch_size = batch_size
        self.pad_id = pad_id
        # Offloaded weights (accelerate) are on the meta device: its hooks move the inputs.
        self.device = input_device(self.model)
        forward = getattr(self.model, "forward", None)
        try:
            params = inspect.signature(forward).parameters if forward else {}
        except (TypeError, ValueError):
            params = {}
        self.takes_positions = "position_ids" in params
        self.takes_cache = "use_cache" in params
        # The head and anything after the last locator need not run: stop there.
        self.stop = True
        self.shapes: dict[str, list[int]] = {}
        self.source_dtype = torch.float32

    def _forward(
        self, batch: Mapping[str, torch.Tensor], *, positions: Literal["last"] | None
    ) -> Any:
        inputs = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        extra: dict[str, Any] = {"use_cache": False} if self.takes_cache else {}
        if self.takes_positions:
            inputs["position_ids"] = batch["position_ids"].to(self.device)
        cap = self.insp.capture(*self.locs, stop=self.stop, detach=True, positions=positions)
        with torch.no_grad(), cap:
            self.model(**inputs, **extra)
        return cap

    def probe(self, token: int) -> dict[str, list[int]]:
        """Run three tokens once: every locator must record a ``[batch, seq, ...]`` tensor."""
        batch = pad_batch([[token] * 3], padding_side="right", pad_token_id=self.pad_id)
        cap = self._forward(batch, positions=None)
        for loc, key in zip(self.locs, self.keys, strict=True):
            value = _value(cap, loc)
            if not isinstance(value, torch.Tensor):
                raise ExtractionError(
                    f"{key} records {type(value).__name__}, not a tensor: extract a block or a "
                    "module whose output is a hidden state"
                )
            if value.dim() < 2 or tuple(value.shape[:2]) != (1, 3):
                raise ExtractionError(
                    f"{key} records a tensor of shape {list(value.shape)}, not [batch, seq, ...]: "
                    "extract locators whose values have one row per token"
                )
            if not value.is_floating_point():
                raise ExtractionError(f"{key} records {value.dtype} values, not floating point")
            self.source_dtype = value.dtype
            self.shapes[key] = list(value.shape[2:])
        return self.shapes

    def bytes_per_row(self) -> int:
        item = torch.empty((), dtype=self.store).element_size()
        values = sum(math.prod(shape) * item for shape in self.shapes.values())
        return values + 8 * len(TOKEN_COLUMNS)

    def shard(
        self, window: _Window, fingerprint: str, rank: int = 0
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The shard of ``window``: its rows in document order, and its header."""
        lengths = [len(ids) for ids in window.ids]
        per_doc = [(1 if n else 0) if self.last else n for n in lengths]
        offsets = [0]
        for n in per_doc:
            offsets.append(offsets[-1] + n)
        rows = offsets[-1]
        counts = torch.tensor(per_doc, dtype=torch.long)
        docs = torch.arange(window.first, window.end, dtype=torch.long)
        tensors: dict[str, torch.Tensor] = {
            key: torch.empty((rows, *self.shapes[key]), dtype=self.store) for key in self.keys
        }
        if self.last:
            pos = torch.tensor([n - 1 for n in lengths if n], dtype=torch.long)
            token_ids = torch.tensor([ids[-1] for ids in window.ids if ids], dtype=torch.long)
        else:
            token_ids = torch.tensor(list(itertools.chain.from_iterable(window.ids)))
            starts = torch.tensor(offsets[:-1], dtype=torch.long).repeat_interleave(counts)
            pos = torch.arange(rows, dtype=torch.long) - starts
        tensors["doc"] = docs.repeat_interleave(counts)
        tensors["pos"] = pos.reshape(rows)
        tensors["token_id"] = token_ids.to(torch.long).reshape(rows)
        # Longest first: documents of similar length share a batch, so little is padding.
        order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: (-lengths[i], i))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            self._batch(chunk, window, offsets, tensors)
        header = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "rank": rank,
            "docs": [window.first, window.end],
            "rows": rows,
            "tokens": sum(lengths),
            "truncated": window.truncated,
            "empty": [window.first + i for i, n in enumerate(lengths) if not n],
        }
        return tensors, {"introspect": json.dumps(header)}

    def _batch(
        self,
        chunk: list[int],
        window: _Window,
        offsets: list[int],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        batch = _pad_right([window.ids[i] for i in chunk], self.pad_id)
        cap = self._forward(batch, positions="last" if self.last else None)
        if self.last:
            dest = torch.tensor([offsets[i] for i in chunk], dtype=torch.long)
            for loc, key in zip(self.locs, self.keys, strict=True):
                value = _value(cap, loc)[:, 0]
                tensors[key].index_copy_(0, dest, value.to(self.store).to("cpu"))
            return
        if _copies_rows(self.device):
            # Right padding: each document's rows are the first of its example, and go to
            # consecutive rows of the shard; one copy casts and places them.
            for loc, key in zip(self.locs, self.keys, strict=True):
                value, target = _value(cap, loc), tensors[key]
                for row, i in enumerate(chunk):
                    start, stop = offsets[i], offsets[i + 1]
                    target[start:stop].copy_(value[row, : stop - start])
            return
        # On an accelerator: gather and cast there, then one transfer per locator.
        dest = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in chunk])
        real = batch["attention_mask"].flatten().nonzero().squeeze(1).to(self.device)
        for loc, key in zip(self.locs, self.keys, strict=True):
            picked = _value(cap, loc).flatten(0, 1).index_select(0, real)
            tensors[key].index_copy_(0, dest, picked.to(self.store).to("cpu"))

    def check_range(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse float16 values that are not finite: past its range, a value becomes inf."""
        if self.store != torch.float16 or self.source_dtype == torch.float16:
            return
        import numpy as np

        for key in self.keys:
            # numpy, not torch: this runs on the writer thread, and a torch operation there
            # would share torch's thread pool with the forward pass (both slow down).
            if not bool(np.isfinite(tensors[key].numpy()).all()):
                raise ExtractionError(
                    f"{key} has values float16 cannot hold (beyond its range of +-65504, or not "
                    "finite): rerun with --dtype bfloat16 or --dtype float32 (and --force)"
                )


def _pad_right(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``pad_batch(..., padding_side="right")``, built with a few tensor operations."""
    lengths = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.long)
    mask = mask.long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def _copies_rows(device: torch.device) -> bool:
    """Whether rows are copied document by document (on the CPU: one pass, no gather), or
    gathered where the model runs and sent over once (on an accelerator)."""
    return device.type == "cpu"


def _check_locators(insp: Inspector, locators: Sequence[str]) -> list[Locator]:
    if not locators:
        raise LocatorError("name at least one locator with --at, e.g. --at 'block[:]'")
    locs: list[Locator] = []
    for loc in insp.expand(locators):
        if query_key_site(loc):
            site = str(loc).rsplit(".", 1)[-1]
            raise LocatorError(
                f"{loc} is [batch, heads, query, key], not one row per token: extract "
                f"{str(loc).removesuffix('.' + site)}.z or the block instead"
            )
        if str(loc) in TOKEN_COLUMNS:
            raise LocatorError(f"{loc} has the name of a token-table column: it cannot be stored")
        if str(loc) not in {str(seen) for seen in locs}:
            locs.append(loc)
    return locs


def _num_blocks(insp: Inspector) -> dict[str, int]:
    # Keyed by stack ("" for the main one), as locators name them; extract refuses
    # encoder-decoder models, so there is one.
    return {"": insp.num_blocks}


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


def extract(
    inspector: Inspector,
    tokenizer: Any,
    inputs: Inputs | Sequence[str | os.PathLike[str]],
    locators: Sequence[str],
    out: str | os.PathLike[str],
    *,
    positions: Position = "all",
    dtype: str = "float16",
    batch_size: int = 8,
    max_length: int | None = None,
    text_field: str = "text",
    force: bool = False,
    model_name: str | None = None,
    shard_rows: int | None = None,
    shard_tokens: int | None = None,
    queue_size: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the model over every document of ``inputs`` and write what ``locators`` record to
    the folder ``out`` (safetensors shards and ``manifest.json``); returns the manifest.

    ``positions``: ``"all"`` (a row per token) or ``"last"`` (a row per document, its last
    token). Documents longer than ``max_length`` tokens (default: the model's context) are
    truncated and listed in the manifest. Values equal a capture of each document run alone:
    batches are padded on the right, with the attention mask and position ids from it.

    A shard closes at ``shard_rows`` rows (default: about 64 MiB of values) or
    ``shard_tokens`` tokens through the model (default 32,768), whichever comes first: an
    interruption keeps every complete shard, and a rerun goes on from there.

    The folder may hold an unfinished run with the same settings: it is resumed. Other
    settings are refused unless ``force`` (which deletes the old extraction's files, never
    anyone else's), and so are other weights under the same model name (the folder records
    the model's :func:`weights_fingerprint`). Inside a ``torch.distributed`` group each rank
    extracts its share and rank 0 writes the manifest; every rank returns it.

    Example:
        >>> import tempfile
        >>> from introspect import ActivationDataset, Inspector
        >>> from introspect.zoo import load_model
        >>> model, tokenizer = load_model("toy-llama", progress=False)
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "corpus.txt").write_text("Hello world\\nA second document\\n")
        >>> manifest = extract(Inspector(model), tokenizer, [folder / "corpus.txt"],
        ...                    ["block[-1]"], folder / "acts", dtype="float32")
        >>> ds = ActivationDataset(folder / "acts")
        >>> ds["block[-1]"].shape[1], ds.num_documents, manifest["locators"]
        (64, 2, ['block[3]'])
    """
    started = time.perf_counter()
    insp = inspector
    if positions not in ("all", "last"):
        raise ExtractionError(f"positions must be 'all' or 'last', got {positions!r}")
    if dtype not in DTYPES:
        raise ExtractionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ExtractionError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ExtractionError(f"max_length must be at least 1, got {max_length}")
    for name, value in (("shard_rows", shard_rows), ("shard_tokens", shard_tokens)):
        if value is not None and value < 1:
            raise ExtractionError(f"{name} must be at least 1, got {value}")
    if tokenizer is None:
        raise ExtractionError(
            "this model has no tokenizer, so it cannot read text: load a folder or hub id that "
            "ships one"
        )
    if getattr(getattr(insp.model, "config", None), "is_encoder_decoder", False):
        raise ExtractionError(
            f"{type(insp.model).__name__} is an encoder-decoder model: extract runs "
            "decoder-only and encoder-only models"
        )
    hard = max_positions(insp.model)
    if max_length is not None and hard is not None and max_length > hard:
        raise ExtractionError(
            f"--max-length {max_length} is more than this model's {hard} positions "
            f"({type(insp.model).__name__} looks each position up in a table of {hard} rows): "
            f"use --max-length {hard} or less, or leave it out (the default is the model's "
            "context)"
        )
    docs = inputs if isinstance(inputs, Inputs) else read_inputs(inputs, text_field)
    locs = _check_locators(insp, locators)
    limit = max_length if max_length is not None else context_length(insp.model)
    param = next((p for p in insp.model.parameters()), None)
    model_dtype = str(param.dtype).removeprefix("torch.") if param is not None else "float32"
    settings = settings_of(
        model=model_name or type(insp.model).__name__,
        locators=locators,
        inputs=docs,
        positions=positions,
        dtype=dtype,
        text_field=text_field,
        max_length=limit,
        adapter=insp.adapter.name,
        model_dtype=model_dtype,
    )
    fingerprint = _fingerprint(settings)
    weights = weights_fingerprint(insp.model)
    folder = Path(out).expanduser()
    rank, world = _world()
    state = check_output_dir(folder, settings, force=force, weights=weights)
    if state == "complete":
        return read_json(folder / MANIFEST)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    engine = _Engine(
        insp, locs, last=positions == "last", store=DTYPES[dtype], batch_size=batch_size,
        pad_id=int(pad_id or 0),
    )  # fmt: skip
    engine.probe(int(pad_id or 0))
    rows_per_shard = shard_rows or max(1, _SHARD_BYTES // engine.bytes_per_row())

    _barrier()  # every rank has checked the folder before rank 0 changes it
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # Everything with --force; else what a killed run left half-written.
        _clear(folder, hidden_only=not force)
        previous = read_json(folder / PROGRESS) if (folder / PROGRESS).is_file() else {}
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "status": "running",
            "fingerprint": fingerprint,
            "settings": settings,
            "weights": weights,
            "model_class": type(insp.model).__name__,
            "num_blocks": _num_blocks(insp),
            "locators": engine.keys,
            "inputs": docs.describe(),
            "bytes_per_row": engine.bytes_per_row(),
            "attempt": int(previous.get("attempt", 0)) + 1,
        }
        _write_json(folder / PROGRESS, record)
    _barrier()
    done = _scan(folder, fingerprint)
    _barrier()  # nobody writes a shard before every rank has seen the same ones
    earlier = {
        "shards": len(done),
        "documents": sum(shard.end - shard.first for shard in done),
        "rows": sum(shard.rows for shard in done),
        "tokens": sum(shard.tokens for shard in done),
    }
    remaining = _remaining(done, docs.total)
    sizes = docs.weights()
    anchors = _anchors(sizes)
    share = _share(remaining, sizes, rank, world)

    tokenize = _tokenizer_fn(tokenizer)
    writer = _Writer(folder, queue_size)
    bar = _bar(sum(b - a for a, b in share), enabled=progress and rank == 0)
    windows = _Background(
        _windows(
            _runs(share, remaining, anchors),
            docs,
            tokenize,
            limit,
            engine.last,
            rows_per_shard,
            anchors,
            shard_tokens=shard_tokens,
        ),
        size=2,
        name="introspect-reader",
    )
    _run(engine, windows, writer, bar, fingerprint, rank)
    _barrier()  # every rank's shards are on disk
    if rank == 0:
        done = _scan(folder, fingerprint)
        seconds = time.perf_counter() - started
        tokens_now = sum(shard.tokens for shard in done) - earlier["tokens"]
        run = {
            "world_size": world,
            "batch_size": batch_size,
            "device": str(engine.device),
            "seconds": round(seconds, 3),
            # What this run put through the model and wrote; "resumed": what earlier runs had.
            "shards": len(done) - earlier["shards"],
            "documents": docs.total - earlier["documents"],
            "rows": sum(shard.rows for shard in done) - earlier["rows"],
            "tokens": tokens_now,
            "tokens_per_second": round(tokens_now / seconds, 1) if seconds > 0 else None,
            "resumed": earlier,
        }
        _finish(folder, done, read_json(folder / PROGRESS), docs.total, run)
    _barrier()
    return read_json(folder / MANIFEST)


def _run(
    engine: _Engine,
    windows: _Background,
    writer: _Writer,
    bar: Any,
    fingerprint: str,
    rank: int,
) -> None:
    """The main loop: each tokenized shard through the model, then to the writer."""
    try:
        for window in windows:
            tensors, header = engine.shard(window, fingerprint, rank)
            name = shard_name(window.first, window.end)
            # The float16 range check runs on the writer thread, beside the next forward.
            writer.put((name, tensors, header, engine.check_range))
            if bar is not None:
                bar.update(window.end - window.first)
        writer.finish()
    except BaseException:
        windows.close()
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def _bar(total: int, enabled: bool) -> Any:
    import sys

    if not progress_enabled(enabled) or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, unit="doc", desc="extract", file=sys.stderr, leave=False)
