"""The corpus ``introspect extract`` reads: text files, JSON lines, datasets folders.

Every input is read once before any work: each document is checked (UTF-8, its text field
present) and the content is hashed, so a rerun can tell whether its inputs changed. Later reads
fetch a contiguous run of documents by byte offset (or row), never a whole input, so a corpus
larger than memory is fine. Documents are numbered across the inputs in the order given.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from introspect._errors import CorpusError, MissingDependencyError

__all__ = ["Inputs", "read_inputs"]

_DATA_INSTALL = 'pip install "introspect-lm[data]"'


def _sha256_file(path: Path, digest: Any) -> int:
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size


class _Source:
    """One input: a text file (a document per line), a JSON-lines file or a datasets folder.

    Reading it once checks every document and computes its content hash; later reads fetch a
    contiguous run of documents by their byte offsets (or rows), never the whole input.
    """

    def __init__(self, path: Path, text_field: str) -> None:
        self.path = path
        self.text_field = text_field
        self._starts = array.array("q")
        self._ends = array.array("q")
        self._dataset: Any = None
        if path.is_dir():
            self.kind = "datasets"
            self._read_dataset()
        elif path.suffix.lower() == ".txt":
            self.kind = "txt"
            self._read_lines(jsonl=False)
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            self.kind = "jsonl"
            self._read_lines(jsonl=True)
        else:
            raise CorpusError(
                f"--input {path}: use a .txt file (one document per line), a .jsonl file "
                f"(a {text_field!r} field per line) or a folder written by datasets' save_to_disk"
            )
        if self.count == 0:
            raise CorpusError(f"--input {path} holds no documents: it is empty")

    # reading ---------------------------------------------------------------------------------

    def _read_lines(self, jsonl: bool) -> None:
        digest = hashlib.sha256()
        offset = 0
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise CorpusError(f"cannot read --input {self.path}: {exc.strerror or exc}") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                digest.update(line)
                start, offset = offset, offset + len(line)
                body = line[:-1] if line.endswith(b"\n") else line
                body = body[:-1] if body.endswith(b"\r") else body
                if number == 1 and body.startswith(b"\xef\xbb\xbf"):
                    body, start = body[3:], start + 3
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(
                        f"--input {self.path} line {number} is not UTF-8 text ({exc.reason} at "
                        f"byte {exc.start}): convert the file to UTF-8"
                    ) from None
                if jsonl:
                    if not text.strip():
                        continue  # blank lines separate nothing in JSON lines
                    self._check_record(text, number)
                self._starts.append(start)
                self._ends.append(start + len(body))
        self.sha256 = digest.hexdigest()
        self.size = offset
        self.count = len(self._starts)

    def _check_record(self, text: str, number: int) -> None:
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise CorpusError(f"--input {self.path} line {number} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"--input {self.path} line {number} is not a JSON object: each line needs a "
                f"{self.text_field!r} field"
            )
        value = record.get(self.text_field)
        if not isinstance(value, str):
            fields = ", ".join(sorted(record)) or "none"
            what = "has no" if self.text_field not in record else "has a non-text"
            raise CorpusError(
                f"--input {self.path} line {number} {what} {self.text_field!r} field (its "
                f"fields: {fields}): name the text field with --text-field"
            )

    def _read_dataset(self) -> None:
        path = self.path
        if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            raise CorpusError(
                f"--input {path} is a folder but not one datasets' save_to_disk wrote (no "
                "state.json): pass a .txt or .jsonl file, or a save_to_disk folder"
            )
        try:
            import datasets
        except ImportError:
            raise MissingDependencyError(
                f"--input {path} is a datasets folder, which needs the datasets package: "
                f"{_DATA_INSTALL}"
            ) from None
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise CorpusError(f"cannot read --input {path} with datasets: {exc}") from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = ", ".join(sorted(loaded))
            raise CorpusError(
                f"--input {path} holds several splits ({splits}): pass one, e.g. "
                f"{path / sorted(loaded)[0]}"
            )
        if self.text_field not in loaded.column_names:
            raise CorpusError(
                f"--input {path} has no {self.text_field!r} column (its columns: "
                f"{', '.join(loaded.column_names)}): name the text column with --text-field"
            )
        feature = loaded.features[self.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise CorpusError(
                f"--input {path}: column {self.text_field!r} holds {feature}, not text: name "
                "the text column with --text-field"
            )
        digest = hashlib.sha256()
        size = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            size += _sha256_file(file, digest)
        self._dataset = loaded.select_columns([self.text_field])
        self.sha256 = digest.hexdigest()
        self.size = size
        self.count = len(loaded)

    # documents -------------------------------------------------------------------------------

    def texts(self, start: int, stop: int) -> list[str]:
        """Documents ``start:stop`` of this input."""
        if stop <= start:
            return []
        if self._dataset is not None:
            values = self._dataset[start:stop][self.text_field]
            return [value or "" for value in values]
        base = self._starts[start]
        with self.path.open("rb") as handle:
            handle.seek(base)
            data = handle.read(self._ends[stop - 1] - base)
        texts = [
            data[self._starts[i] - base : self._ends[i] - base].decode("utf-8")
            for i in range(start, stop)
        ]
        if self.kind == "jsonl":
            texts = [json.loads(text)[self.text_field] for text in texts]
        return texts

    def weights(self) -> torch.Tensor:
        """Each document's size in bytes, which balances the ranks' shares."""
        if self._dataset is not None:
            import pyarrow.compute as pc

            column = self._dataset.data.column(self.text_field)
            lengths = pc.fill_null(pc.binary_length(column), 0)
            return torch.as_tensor(lengths.to_numpy(), dtype=torch.long)
        starts = torch.frombuffer(self._starts, dtype=torch.long) if self.count else None
        ends = torch.frombuffer(self._ends, dtype=torch.long) if self.count else None
        if starts is None or ends is None:
            return torch.zeros(0, dtype=torch.long)
        return ends - starts

    def describe(self, first: int) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.sha256,
            "bytes": self.size,
            "documents": [first, first + self.count],
            **({"text_field": self.text_field} if self.kind != "txt" else {}),
        }


class Inputs:
    """The documents of several inputs, numbered across them in the order given.

    Build it with :func:`read_inputs`, which checks every input before any work.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("one\\ntwo\\n")
        >>> _ = (folder / "b.jsonl").write_text('{"text": "three"}\\n')
        >>> docs = read_inputs([folder / "a.txt", folder / "b.jsonl"])
        >>> len(docs), docs.texts(1, 3)
        (3, ['two', 'three'])
    """

    def __init__(self, sources: Sequence[_Source]) -> None:
        self.sources = list(sources)
        self.firsts: list[int] = []
        total = 0
        for source in self.sources:
            self.firsts.append(total)
            total += source.count
        self.total = total

    def __len__(self) -> int:
        return self.total

    def texts(self, start: int, stop: int) -> list[str]:
        """The texts of documents ``start:stop`` (global numbers)."""
        found: list[str] = []
        for first, source in zip(self.firsts, self.sources, strict=True):
            a, b = max(start, first), min(stop, first + source.count)
            if a < b:
                found.extend(source.texts(a - first, b - first))
        return found

    def weights(self) -> torch.Tensor:
        """Each document's size in bytes."""
        parts = [source.weights() for source in self.sources]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def describe(self) -> list[dict[str, Any]]:
        """One entry per input: path, kind, content hash, size and its document range."""
        return [
            source.describe(first) for first, source in zip(self.firsts, self.sources, strict=True)
        ]

    @property
    def kinds(self) -> set[str]:
        """The kinds of input: ``txt``, ``jsonl``, ``datasets``."""
        return {source.kind for source in self.sources}

    @property
    def hashes(self) -> list[str]:
        """The inputs' content hashes (what a rerun is checked against, not their paths)."""
        return [source.sha256 for source in self.sources]


def read_inputs(paths: Sequence[str | os.PathLike[str]], text_field: str = "text") -> Inputs:
    """Open and check every input: ``.txt`` (a document per line), ``.jsonl`` (a ``text_field``
    per line) or a datasets ``save_to_disk`` folder. A missing, unreadable or empty input, a
    line that is not UTF-8 or a record without its text is an error here, before any work.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "corpus.txt"
        >>> _ = path.write_text("Hello world\\nSecond line\\n")
        >>> docs = read_inputs([path])
        >>> len(docs), docs.describe()[0]["kind"]
        (2, 'txt')
    """
    if not paths:
        raise CorpusError("name at least one --input (a .txt, a .jsonl or a datasets folder)")
    sources = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CorpusError(f"--input {raw} does not exist")
        if not path.is_dir() and not os.access(path, os.R_OK):
            raise CorpusError(f"cannot read --input {raw} (permission denied)")
        sources.append(_Source(path, text_field))
    return Inputs(sources)
