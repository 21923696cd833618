"""``extract``: a corpus's activations streamed to disk (what ``introspect extract`` runs).

It checks every argument and the output folder before any work, then wires the stages
together: a reader thread tokenizes the next shard's documents, this thread runs the model on
them (:mod:`introspect._scale.engine`), the writer thread puts finished shards on disk, and
rank 0 writes the manifest once every rank's shards are there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from introspect._batching import context_length, max_positions
from introspect._errors import ExtractionError, LocatorError
from introspect._locators import Locator, query_key_site
from introspect._progress import progress_enabled
from introspect._scale.corpus import Inputs, read_inputs
from introspect._scale.dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    TOKEN_COLUMNS,
    read_json,
    shard_name,
)
from introspect._scale.distributed import _barrier, _world
from introspect._scale.engine import _Engine
from introspect._scale.files import _clear, _write_json
from introspect._scale.records import _finish, check_output_dir
from introspect._scale.settings import (
    DTYPES,
    Position,
    _fingerprint,
    settings_of,
    weights_fingerprint,
)
from introspect._scale.shards import _remaining, _scan, _share, _totals
from introspect._scale.threads import _Background, _Writer
from introspect._scale.windows import _anchors, _runs, _tokenizer_fn, _windows

if TYPE_CHECKING:
    from introspect._inspector import Inspector

__all__ = ["extract"]

_SHARD_BYTES = 64 * 2**20
"""The default size of a shard, from which ``shard_rows`` is derived."""


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
    earlier = _totals(done)
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
