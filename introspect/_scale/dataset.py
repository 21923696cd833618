"""Reading an extraction back: :class:`ActivationDataset` over ``manifest.json`` and its shards.

``introspect extract`` (see :mod:`introspect._scale.run`) writes a folder::

    DIR/manifest.json                       what was extracted, from what, the shard list
    DIR/shard-000000000-000000128.safetensors   documents 0..127: per locator a [rows, ...]
                                                tensor, plus the token table doc/pos/token_id

The manifest exists only once every shard is complete, and lists the shards in document
order, each with its document range and its global row range; the rows of the dataset are the
shards' rows in that order, so they are in document order whatever wrote them (one process or
many). Nothing is loaded whole: each read opens the shards it needs with safetensors'
``safe_open`` (which memory-maps the file) and reads only the rows asked for.

This module also owns the folder's format (the file names, the manifest keys), so the writer
and the reader cannot drift apart.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from introspect._errors import DatasetError, LocatorError
from introspect._locators import Locator

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PROGRESS",
    "TOKEN_COLUMNS",
    "WORK",
    "ActivationDataset",
    "Column",
    "TokenTable",
    "is_ours",
    "read_json",
    "shard_name",
    "shard_range",
]

FORMAT = "introspect-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
"""Written last, once every shard is complete: a folder with it is a finished dataset."""
PROGRESS = "progress.json"
"""Written when an extraction starts (its arguments, to check a rerun against); removed once
the manifest is written."""
WORK = ".partial"
"""The hidden folder shards are written in before they are renamed into place."""
TOKEN_COLUMNS = ("doc", "pos", "token_id")
"""The token table every shard holds beside its activations, one int64 entry per row."""

_SHARD = re.compile(r"^shard-(\d{9})-(\d{9})\.safetensors$")
# Temporary and set-aside names of our own atomic writes (see introspect._export).
_OURS_HIDDEN = re.compile(r"^\.(manifest\.json|progress\.json)\.[0-9a-f]+\.(partial|old)$")
_OPEN_SHARDS = 64


def shard_name(first_doc: int, end_doc: int) -> str:
    """The file name of the shard holding documents ``first_doc`` to ``end_doc - 1``.

    Example:
        >>> shard_name(0, 128)
        'shard-000000000-000000128.safetensors'
    """
    return f"shard-{first_doc:09d}-{end_doc:09d}.safetensors"


def shard_range(name: str) -> tuple[int, int] | None:
    """The document range ``(first, end)`` a shard file name stands for, or ``None``.

    Example:
        >>> shard_range("shard-000000128-000000256.safetensors")
        (128, 256)
        >>> shard_range("notes.txt") is None
        True
    """
    match = _SHARD.match(name)
    return (int(match[1]), int(match[2])) if match else None


def is_ours(name: str) -> bool:
    """Whether a file name in an extraction folder is one ``introspect extract`` writes.

    Example:
        >>> is_ours("manifest.json"), is_ours(".partial"), is_ours(".manifest.json.1a2b.partial")
        (True, True, True)
        >>> is_ours("notes.txt")
        False
    """
    return name in (MANIFEST, PROGRESS, WORK) or bool(
        _SHARD.match(name) or _OURS_HIDDEN.match(name)
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a DatasetError saying the file is not one.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.json"
        >>> _ = p.write_text('{"format": "x"}')
        >>> read_json(p)["format"]
        'x'
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{path} is not a JSON object")
    return value


class _Shards:
    """The shard files of a dataset, opened lazily (a bounded number at a time)."""

    def __init__(self, folder: Path, files: Sequence[str], row_starts: Sequence[int]) -> None:
        self.folder = folder
        self.files = list(files)
        self.starts = list(row_starts)  # one more than files: the end of the last
        self._open: OrderedDict[int, Any] = OrderedDict()

    def handle(self, i: int) -> Any:
        from safetensors import safe_open

        found = self._open.get(i)
        if found is not None:
            self._open.move_to_end(i)
            return found
        path = self.folder / self.files[i]
        try:
            found = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise DatasetError(
                f"cannot open shard {path}: {exc} (the dataset is incomplete or damaged: rerun "
                "the extraction with --force)"
            ) from None
        self._open[i] = found
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return found

    def locate(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def read(self, key: str, start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start:stop`` of ``key`` (global row numbers), one piece per shard touched."""
        pieces = []
        i = self.locate(start) if start < stop else 0
        while start < stop and i < len(self.files):
            lo, hi = self.starts[i], self.starts[i + 1]
            if hi > start:
                a, b = start - lo, min(stop, hi) - lo
                pieces.append(self.handle(i).get_slice(key)[a:b])
                start = lo + b
            i += 1
        return pieces

    def __getstate__(self) -> dict[str, Any]:
        # Open handles do not cross processes (DataLoader workers): each reopens its own.
        return {**self.__dict__, "_open": OrderedDict()}


def _single(index: Any) -> int | None:
    """``index`` as an int when it is one integer (Python, NumPy or a 0-d tensor)."""
    if isinstance(index, bool) or type(index).__name__ == "bool_":
        return None
    if isinstance(index, torch.Tensor):
        if index.dim() or index.is_floating_point() or index.dtype == torch.bool:
            return None
        return int(index)
    try:
        return operator.index(index)
    except TypeError:
        return None


def _index(rows: int, index: Any) -> tuple[int, int] | torch.Tensor:
    """A row index as a contiguous ``(start, stop)`` or as a tensor of rows (in any order)."""
    if isinstance(index, bool):
        raise IndexError("a boolean is not a row index")
    single = _single(index)
    if single is not None:
        index = single
        if not -rows <= index < rows:
            raise IndexError(f"row {index} is out of range for {rows} rows")
        index %= rows
        return index, index + 1
    if isinstance(index, slice):
        start, stop, step = index.indices(rows)
        if step == 1:
            return start, max(start, stop)
        return torch.arange(start, stop, step, dtype=torch.long)
    if isinstance(index, range):
        return _index(rows, slice(index.start, index.stop, index.step))
    tensor = torch.as_tensor(index)
    if tensor.dtype == torch.bool:
        if tensor.shape != (rows,):
            raise IndexError(f"a boolean row mask needs shape [{rows}], got {tuple(tensor.shape)}")
        return tensor.nonzero().flatten()
    if tensor.is_floating_point() or tensor.dim() > 1:
        raise IndexError("rows are selected by an int, a slice, a range or a 1-d list of ints")
    tensor = tensor.long().flatten()
    if tensor.numel() and (int(tensor.min()) < -rows or int(tensor.max()) >= rows):
        raise IndexError(f"row indices out of range for {rows} rows")
    return tensor % max(rows, 1)


def _gather(shards: _Shards, key: str, rows: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (any order, repeats allowed) of ``key``, reading each run of
    neighbouring rows once."""
    if rows.numel() == 0:
        return empty
    order = torch.unique(rows)  # sorted
    values = order.tolist()
    pieces: list[torch.Tensor] = []
    run_start = prev = values[0]
    for row in [*values[1:], None]:
        if row is not None and row == prev + 1:
            prev = row
            continue
        pieces.extend(shards.read(key, run_start, prev + 1))
        if row is not None:
            run_start = prev = row
    found = torch.cat(pieces)
    return found[torch.searchsorted(order, rows)]


class Column:
    """One locator's rows (or one token-table column) of a dataset, read lazily.

    ``len(col)`` and ``col.shape`` cost nothing; indexing (an int, a slice, a range, a list or
    tensor of rows, a boolean mask) reads only the rows asked for, from the shards that hold
    them. ``col[:]`` loads the whole column.

    Example:
        >>> ds = ActivationDataset(_demo_dataset())
        >>> col = ds["block[-1]"]
        >>> col.shape, col[1:3].shape, col[[0, 2]].dtype
        (torch.Size([5, 4]), torch.Size([2, 4]), torch.float16)
    """

    def __init__(
        self, shards: _Shards, key: str, rows: int, row_shape: Sequence[int], dtype: torch.dtype
    ) -> None:
        self._shards = shards
        self.key = key
        self.shape = torch.Size([rows, *row_shape])
        self.dtype = dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        found = _index(self.shape[0], index)
        if isinstance(found, torch.Tensor):
            empty = torch.empty((0, *self.shape[1:]), dtype=self.dtype)
            return _gather(self._shards, self.key, found, empty)
        start, stop = found
        pieces = self._shards.read(self.key, start, stop)
        value = torch.cat(pieces) if pieces else torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return value[0] if _single(index) is not None else value

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Column({self.key!r}, shape={list(self.shape)}, dtype={self.dtype})"


class TokenTable:
    """The token each row comes from: ``doc`` (document index), ``pos`` (position in the
    document, after truncation) and ``token_id``, each a lazy :class:`Column` of int64.

    Example:
        >>> tokens = ActivationDataset(_demo_dataset()).tokens
        >>> tokens.doc[:].tolist(), tokens["pos"][:].tolist()
        ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    """

    def __init__(self, columns: dict[str, Column]) -> None:
        self._columns = columns

    @property
    def doc(self) -> Column:
        """The document index of each row."""
        return self._columns["doc"]

    @property
    def pos(self) -> Column:
        """The position of each row's token in its document."""
        return self._columns["pos"]

    @property
    def token_id(self) -> Column:
        """The token id of each row."""
        return self._columns["token_id"]

    def __getitem__(self, name: str) -> Column:
        if name not in self._columns:
            raise KeyError(f"the token table has {', '.join(TOKEN_COLUMNS)}; not {name!r}")
        return self._columns[name]

    def __len__(self) -> int:
        return len(self.doc)

    def __repr__(self) -> str:
        return f"TokenTable(rows={len(self)}, columns={list(TOKEN_COLUMNS)})"


_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


class ActivationDataset(Dataset[dict[str, torch.Tensor]]):
    """The activations ``introspect extract`` wrote to ``path``, read lazily from its shards.

    - ``len(ds)``: the number of rows (tokens, or documents with ``--positions last``);
    - ``ds["block[3]"]``: that locator's ``[rows, hidden]`` values as a lazy :class:`Column`
      (negative block indices count from the end, as everywhere);
    - ``ds.tokens``: the token table (``doc``, ``pos``, ``token_id``);
    - ``ds.documents()`` / ``ds.rows_of(doc)``: the documents and the rows of one;
    - ``ds[i]`` (and ``DataLoader(ds, ...)``): row ``i`` as a dict of tensors: the chosen
      ``locators`` (default: all) and the token table;
    - ``ds.batches(n)``: dicts of ``[n, ...]`` tensors, read shard by shard.

    Rows are in document order whatever produced them. Only a finished extraction (one with
    ``manifest.json``) can be read; an unfinished one is resumed by rerunning its command.

    Example:
        >>> ds = ActivationDataset(_demo_dataset())
        >>> len(ds), ds.locators, ds["block[-1]"].shape
        (5, ['block[0]', 'block[1]'], torch.Size([5, 4]))
        >>> list(ds.documents()), ds.rows_of(1)
        ([0, 1], range(3, 5))
        >>> sorted(ds[0])
        ['block[0]', 'block[1]', 'doc', 'pos', 'token_id']
    """

    def __init__(self, path: str | os.PathLike[str], locators: Sequence[str] | None = None):
        folder = Path(path).expanduser()
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            if (folder / PROGRESS).is_file():
                raise DatasetError(
                    f"{folder} holds an unfinished extraction (no {MANIFEST} yet): rerun the "
                    "same introspect extract command to finish it"
                )
            raise DatasetError(
                f"{folder} is not an extraction folder (no {MANIFEST}): write one with "
                "introspect extract MODEL --input ... --at ... --out DIR"
            )
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{manifest_path} is not an introspect extract manifest")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise DatasetError(
                f"{manifest_path} has format version {manifest['format_version']}, newer than "
                f"this introspect reads ({FORMAT_VERSION}): upgrade introspect-lm"
            )
        self.path = folder
        self.manifest = manifest
        """The parsed ``manifest.json``."""
        self.locators: list[str] = list(manifest["locators"])
        """Every locator the dataset holds, as stored (``block[3]``, ``block[0].input``, ...)."""
        shards = manifest["shards"]
        starts = [int(s["rows"][0]) for s in shards] + [int(manifest["rows"])]
        self._doc_starts = [int(s["docs"][0]) for s in shards]
        self._shards = _Shards(folder, [s["file"] for s in shards], starts)
        rows = int(manifest["rows"])
        dtype = _DTYPES[manifest["dtype"]]
        self._columns = {
            loc: Column(self._shards, loc, rows, manifest["shapes"][loc], dtype)
            for loc in self.locators
        }
        self.tokens = TokenTable(
            {name: Column(self._shards, name, rows, (), torch.long) for name in TOKEN_COLUMNS}
        )
        """The token table: ``doc``, ``pos``, ``token_id`` per row."""
        self.selected = [self._key(loc) for loc in locators] if locators else list(self.locators)
        """The locators ``ds[i]`` and ``batches`` return (all unless chosen)."""
        self._doc_cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    # -- locators ----------------------------------------------------------------------------

    def _key(self, text: str) -> str:
        if text in self._columns:
            return text
        loc = Locator.parse(text)
        if loc.is_block and not loc.is_slice:
            counts = self.manifest.get("num_blocks", {})
            total = counts.get(loc.stack or "") if isinstance(counts, dict) else None
            if isinstance(total, int):
                loc = loc.resolve_index(total, self.manifest.get("adapter", "this model"))
        key = str(loc)
        if key not in self._columns:
            if loc.is_slice:
                raise LocatorError(
                    f"{text} names several locators: read one at a time (this dataset holds "
                    f"{', '.join(self.locators)})"
                )
            raise LocatorError(
                f"{text} was not extracted into {self.path}: it holds {', '.join(self.locators)}"
            )
        return key

    # -- rows --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __getitem__(self, key: Any) -> Any:
        """``ds["block[3]"]``: a lazy column; ``ds[i]``: row ``i`` as a dict of tensors."""
        if isinstance(key, str):
            return self._columns[self._key(key)]
        row = _single(key)
        if row is None:
            raise TypeError(
                f"index a dataset with a locator string (ds['block[3]']) or a row number, not "
                f"{type(key).__name__}"
            )
        out = {loc: self._columns[loc][row] for loc in self.selected}
        for name in TOKEN_COLUMNS:
            out[name] = self.tokens[name][row]
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Several rows at once (what ``DataLoader`` asks for), each shard read once."""
        batch = self._batch(torch.as_tensor(list(indices), dtype=torch.long), self.selected)
        return [{k: v[n] for k, v in batch.items()} for n in range(len(indices))]

    def _batch(self, rows: torch.Tensor | tuple[int, int], locators: Sequence[str]) -> Any:
        out: dict[str, torch.Tensor] = {}
        for loc in locators:
            out[loc] = self._columns[loc][rows if isinstance(rows, torch.Tensor) else slice(*rows)]
        for name in TOKEN_COLUMNS:
            column = self.tokens[name]
            out[name] = column[rows if isinstance(rows, torch.Tensor) else slice(*rows)]
        return out

    def batches(
        self,
        batch_size: int,
        *,
        locators: Sequence[str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_chunks: int = 16,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Dicts of ``[batch_size, ...]`` tensors (the locators and the token table).

        In order, each batch is one contiguous read. With ``shuffle`` the rows come in a
        seeded random order that stays fast on disk: the dataset is read in chunks of
        ``shuffle_chunks * batch_size`` contiguous rows, the chunks in random order, each
        chunk's rows shuffled (as sparse-autoencoder training loops do with a shuffle
        buffer). For a uniform shuffle use ``DataLoader(ds, shuffle=True)``.

        Example:
            >>> ds = ActivationDataset(_demo_dataset())
            >>> [b["block[1]"].shape[0] for b in ds.batches(2)]
            [2, 2, 1]
            >>> next(ds.batches(4, shuffle=True, locators=["block[0]"]))["doc"].shape
            torch.Size([4])
        """
        if batch_size < 1 or shuffle_chunks < 1:
            raise ValueError(
                f"batch_size and shuffle_chunks must be at least 1, got {batch_size} and "
                f"{shuffle_chunks}"
            )
        keys = [self._key(loc) for loc in locators] if locators else self.selected
        total = len(self)
        if not shuffle:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                if drop_last and stop - start < batch_size:
                    return
                yield self._batch((start, stop), keys)
            return
        generator = torch.Generator().manual_seed(seed)
        size = shuffle_chunks * batch_size
        starts = torch.arange(0, total, size)
        pending: dict[str, torch.Tensor] | None = None
        for start in starts[torch.randperm(len(starts), generator=generator)].tolist():
            chunk = self._batch((start, min(start + size, total)), keys)
            order = torch.randperm(len(chunk["doc"]), generator=generator)
            chunk = {key: value[order] for key, value in chunk.items()}
            if pending is not None:  # the rest of the previous chunk leads
                chunk = {key: torch.cat([pending[key], chunk[key]]) for key in chunk}
            whole = len(chunk["doc"]) // batch_size * batch_size
            for at in range(0, whole, batch_size):
                yield {key: value[at : at + batch_size] for key, value in chunk.items()}
            pending = {key: value[whole:] for key, value in chunk.items()}
        if pending is not None and len(pending["doc"]) and not drop_last:
            yield pending

    # -- documents ---------------------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        """How many documents the inputs held (every one is in the dataset, empty ones with no
        rows)."""
        return int(self.manifest["documents"]["total"])

    def documents(self) -> range:
        """The document indices, in order (the inputs' documents numbered across all inputs).

        Example:
            >>> ActivationDataset(_demo_dataset()).documents()
            range(0, 2)
        """
        return range(self.num_documents)

    def _doc_column(self, shard: int) -> torch.Tensor:
        found = self._doc_cache.get(shard)
        if found is None:
            start, stop = self._shards.starts[shard], self._shards.starts[shard + 1]
            pieces = self._shards.read("doc", start, stop)
            found = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
            self._doc_cache[shard] = found
            if len(self._doc_cache) > 8:
                self._doc_cache.popitem(last=False)
        return found

    def rows_of(self, doc: int) -> range:
        """The rows of document ``doc`` (an empty range for a document without tokens).

        Example:
            >>> ds = ActivationDataset(_demo_dataset())
            >>> ds["block[0]"][ds.rows_of(0)].shape
            torch.Size([3, 4])
        """
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} is out of range (0..{self.num_documents - 1})")
        shard = bisect.bisect_right(self._doc_starts, doc) - 1
        base = self._shards.starts[shard]
        docs = self._doc_column(shard)
        lo = int(torch.searchsorted(docs, doc, right=False))
        hi = int(torch.searchsorted(docs, doc, right=True))
        return range(base + lo, base + hi)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_doc_cache": OrderedDict()}

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({str(self.path)!r}, rows={len(self)}, "
            f"documents={self.num_documents}, locators={self.locators}, "
            f"dtype={self.manifest['dtype']})"
        )


def _demo_dataset() -> Path:
    """A tiny hand-written dataset folder for the examples (2 documents, 5 rows, 2 blocks)."""
    import tempfile

    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="introspect-demo-"))
    docs, pos = [0, 0, 0, 1, 1], [0, 1, 2, 0, 1]
    shards = []
    for first, end, a, b in ((0, 1, 0, 3), (1, 2, 3, 5)):
        tensors = {
            "block[0]": torch.arange(a * 4, b * 4, dtype=torch.float16).reshape(-1, 4),
            "block[1]": -torch.arange(a * 4, b * 4, dtype=torch.float16).reshape(-1, 4),
            "doc": torch.tensor(docs[a:b]),
            "pos": torch.tensor(pos[a:b]),
            "token_id": torch.tensor(pos[a:b]) + 10,
        }
        save_file(tensors, str(folder / shard_name(first, end)))
        shards.append({"file": shard_name(first, end), "docs": [first, end], "rows": [a, b]})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": "demo",
        "num_blocks": {"": 2},
        "locators": ["block[0]", "block[1]"],
        "shapes": {"block[0]": [4], "block[1]": [4]},
        "dtype": "float16",
        "rows": 5,
        "documents": {"total": 2},
        "shards": shards,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder
